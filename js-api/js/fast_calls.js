// Left out of the snapshot on purpose: loading it makes deno_core attach
// the fast-call versions of every op (see `bindFastCalls` in bootstrap.js).
export {};
