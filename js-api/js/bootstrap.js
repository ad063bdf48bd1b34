// Atoll's handler API. Evaluated once at build time into the startup
// snapshot: it assembles the global scope from Deno's web extensions and
// holds the dispatch that turns host requests into handler calls.

import { core, internals, primordials } from "ext:core/mod.js";
import {
  op_atoll_body_close,
  op_atoll_body_try_close,
  op_atoll_body_try_write,
  op_atoll_body_write,
  op_atoll_boot_done,
  op_atoll_common_request_headers,
  op_atoll_fetch_begin,
  op_atoll_fetch_end,
  op_atoll_fetch_response_limit,
  op_atoll_log,
  op_atoll_next_request,
  op_atoll_request_body,
  op_atoll_request_done,
  op_atoll_request_headers,
  op_atoll_respond,
  op_atoll_respond_error,
  op_atoll_respond_resource,
  op_atoll_respond_stream,
  op_atoll_respond_text,
  op_atoll_respond_text_typed,
} from "ext:core/ops";

// The fast-call versions of the ops every request (or every request with
// a body) calls, null until `bindFastCalls` finds them (the snapshot holds
// only the slow ones). They are called from call sites of their own: V8
// emits a fast call only where a call site has only ever seen the one
// function.
let fastRespondText = null;
let fastRespondTextTyped = null;
let fastNextRequest = null;
let fastRequestBody = null;

const {
  ArrayPrototypeIndexOf,
  ArrayPrototypePush,
  ArrayPrototypeShift,
  ArrayPrototypeSlice,
  ArrayPrototypeSplice,
  ArrayPrototypeUnshift,
  Error,
  ErrorPrototype,
  FunctionPrototypeCall,
  JSONParse,
  MapPrototypeDelete,
  MapPrototypeGet,
  MapPrototypeHas,
  MapPrototypeSet,
  NumberParseFloat,
  ObjectDefineProperties,
  ObjectDefineProperty,
  ObjectFreeze,
  ObjectGetOwnPropertyDescriptor,
  ObjectHasOwn,
  ObjectSetPrototypeOf,
  ObjectPrototypeIsPrototypeOf,
  Promise,
  PromisePrototypeThen,
  PromiseReject,
  PromiseResolve,
  ReflectApply,
  SafeMap,
  SafePromiseAllSettled,
  String,
  StringPrototypeEndsWith,
  StringPrototypeStartsWith,
  StringPrototypeToUpperCase,
  StringPrototypeSlice,
  TypedArrayPrototypeGetByteLength,
  StringPrototypeIndexOf,
  TypeError,
  TypeErrorPrototype,
  Uint8ArrayPrototype,
} = primordials;

const webidl = core.loadExtScript("ext:deno_webidl/00_webidl.js");
const event = core.loadExtScript("ext:deno_web/02_event.js");
const timers = core.loadExtScript("ext:deno_web/02_timers.js");
const base64 = core.loadExtScript("ext:deno_web/05_base64.js");
const encoding = core.loadExtScript("ext:deno_web/08_text_encoding.js");
const consoleMod = core.loadExtScript("ext:deno_web/01_console.js");
const compression = core.loadExtScript("ext:deno_web/14_compression.js");
const performance = core.loadExtScript("ext:deno_web/15_performance.js");
const url = core.loadExtScript("ext:deno_web/00_url.js");
const urlPattern = core.loadExtScript("ext:deno_web/01_urlpattern.js");
const streams = core.loadExtScript("ext:deno_web/06_streams.js");
const file = core.loadExtScript("ext:deno_web/09_file.js");
const messagePort = core.loadExtScript("ext:deno_web/13_message_port.js");
const structuredCloneMod = core.loadExtScript(
  "ext:deno_web/02_structured_clone.js",
);
const { DOMException } = core.loadExtScript("ext:deno_web/01_dom_exception.js");
const abortSignal = core.loadExtScript("ext:deno_web/03_abort_signal.js");
const crypto = core.loadExtScript("ext:deno_crypto/00_crypto.js");
const headers = core.loadExtScript("ext:deno_fetch/20_headers.js");

// WebCrypto runs its work on the host's blocking threads, outside the
// isolate's CPU and heap limits. Bound what one isolate can put there: at
// most two operations at a time (the rest wait here and die with the
// isolate), and caps on the parameters that set an operation's cost.
const MAX_CRYPTO_IN_FLIGHT = 2;
/** Most PBKDF2 iterations (Workers' limit). */
const MAX_PBKDF2_ITERATIONS = 100_000;
/** Most bits one deriveBits call or derived/generated key may have. */
const MAX_KEY_BITS = 4096;
/** Most bits of a generated RSA modulus. */
const MAX_RSA_MODULUS_BITS = 4096;
/** Argon2 bounds: memory in KiB (64 MiB), passes, lanes. */
const MAX_ARGON2_MEMORY_KIB = 64 * 1024;
const MAX_ARGON2_PASSES = 10;
const MAX_ARGON2_PARALLELISM = 16;
const cryptoGate = { running: 0, head: null, tail: null };

/** Resolves when this isolate may start one more WebCrypto operation. */
function cryptoTurn() {
  if (cryptoGate.running < MAX_CRYPTO_IN_FLIGHT) {
    cryptoGate.running++;
    return undefined;
  }
  return new Promise((resolve) => {
    const waiter = { resolve, next: null };
    if (cryptoGate.tail === null) cryptoGate.head = waiter;
    else cryptoGate.tail.next = waiter;
    cryptoGate.tail = waiter;
  });
}

/** Hands a finished operation's turn to the next waiter. */
function cryptoDone() {
  const next = cryptoGate.head;
  if (next === null) {
    cryptoGate.running--;
    return;
  }
  cryptoGate.head = next.next;
  if (cryptoGate.head === null) cryptoGate.tail = null;
  next.resolve();
}

/** Dictionary members the operations read (deno_crypto's algorithm
 * parameters), copied even when inherited or non-enumerable. */
const ALGORITHM_MEMBERS = [
  "name", "hash", "salt", "info", "iterations", "memory", "passes",
  "parallelism", "nonce", "secretValue", "associatedData", "length",
  "modulusLength", "publicExponent", "namedCurve", "public", "iv", "counter",
  "additionalData", "tagLength", "label", "saltLength", "context",
  "customization", "outputLength", "functionName", "domainSeparation",
];
/** Members that set an operation's cost: converted to numbers once. */
const COST_MEMBERS = [
  "iterations", "memory", "passes", "parallelism", "length", "modulusLength",
  "outputLength",
];

/** A plain, prototype-less copy of an algorithm dictionary whose members
 * were each read once, so the values checked here are the values the
 * operation sees (no getter, valueOf, toString or prototype can answer
 * the check one way and the operation another). */
function algorithmSnapshot(algorithm) {
  if (algorithm === null || typeof algorithm !== "object") return algorithm;
  const copy = { __proto__: null };
  for (const key in algorithm) copy[key] = algorithm[key];
  for (let i = 0; i < ALGORITHM_MEMBERS.length; i++) {
    const key = ALGORITHM_MEMBERS[i];
    if (!ObjectHasOwn(copy, key) && key in algorithm) copy[key] = algorithm[key];
  }
  if (copy.name !== undefined) copy.name = `${copy.name}`;
  for (let i = 0; i < COST_MEMBERS.length; i++) {
    const key = COST_MEMBERS[i];
    if (copy[key] !== undefined && copy[key] !== null) copy[key] = +copy[key];
  }
  return copy;
}

function algorithmName(algorithm) {
  if (typeof algorithm === "string") return StringPrototypeToUpperCase(algorithm);
  if (algorithm === null || typeof algorithm !== "object") return "";
  return typeof algorithm.name === "string" ? StringPrototypeToUpperCase(algorithm.name) : "";
}

/**
 * Throws NotSupportedError unless `value` (a member of a snapshot) is
 * absent or within [min, max]. The host converts with ToUint32, which
 * wraps: a negative or huge number would become another size, so only
 * the range itself passes (NaN fails every comparison).
 */
function checkCost(value, min, max, what) {
  if (value === undefined || value === null) return;
  if (!(value >= min && value <= max)) {
    throw new DOMException(
      `${what} must be between ${min} and ${max} here (the work runs outside the worker's CPU limit)`,
      "NotSupportedError",
    );
  }
}

/** Checks a (snapshot) algorithm used to derive bits or keys. */
function checkDerivation(algorithm) {
  const name = algorithmName(algorithm);
  if (name === "PBKDF2") {
    checkCost(algorithm.iterations, 0, MAX_PBKDF2_ITERATIONS, "PBKDF2 iterations");
  } else if (StringPrototypeStartsWith(name, "ARGON2")) {
    checkCost(algorithm.memory, 0, MAX_ARGON2_MEMORY_KIB, "Argon2 memory (KiB)");
    checkCost(algorithm.passes, 0, MAX_ARGON2_PASSES, "Argon2 passes");
    checkCost(algorithm.parallelism, 0, MAX_ARGON2_PARALLELISM, "Argon2 parallelism");
  }
}

/** `args` with every algorithm dictionary replaced by a checked snapshot;
 * throws NotSupportedError past the limits. */
function boundedCryptoArgs(method, args) {
  if (method === "digest") {
    // XOFs (cSHAKE, TurboSHAKE, KangarooTwelve) take an output length.
    args[0] = algorithmSnapshot(args[0]);
    if (typeof args[0] === "object" && args[0] !== null) {
      checkCost(args[0].outputLength, 0, MAX_KEY_BITS, "a digest's outputLength in bits");
    }
  } else if (method === "deriveBits") {
    args[0] = algorithmSnapshot(args[0]);
    checkDerivation(args[0]);
    if (args[2] !== undefined && args[2] !== null) args[2] = +args[2];
    checkCost(args[2], 0, MAX_KEY_BITS, "the length in bits");
  } else if (method === "deriveKey") {
    args[0] = algorithmSnapshot(args[0]);
    checkDerivation(args[0]);
    args[2] = algorithmSnapshot(args[2]);
    if (typeof args[2] === "object" && args[2] !== null) {
      checkCost(args[2].length, 0, MAX_KEY_BITS, "the derived key's length in bits");
    }
  } else if (method === "generateKey") {
    args[0] = algorithmSnapshot(args[0]);
    if (typeof args[0] === "object" && args[0] !== null) {
      checkCost(args[0].modulusLength, 0, MAX_RSA_MODULUS_BITS, "an RSA modulusLength");
      checkCost(args[0].length, 0, MAX_KEY_BITS, "the key's length in bits");
    }
  }
  return args;
}

/** The CryptoKey `algorithm` getter, read before any tenant code runs. */
const cryptoKeyAlgorithm = ObjectGetOwnPropertyDescriptor(
  crypto.CryptoKey.prototype,
  "algorithm",
)?.get;

/** Refuses an imported RSA key with a modulus over the limit: its
 * operations cost grows with the cube of its size. (Public keys over
 * 4096 bits are already refused by the host.) */
function checkImportedKey(key) {
  if (cryptoKeyAlgorithm === undefined) return;
  const algorithm = ReflectApply(cryptoKeyAlgorithm, key, []);
  if (algorithm === null || typeof algorithm !== "object" || !ObjectHasOwn(algorithm, "modulusLength")) {
    return;
  }
  checkCost(algorithm.modulusLength, 0, MAX_RSA_MODULUS_BITS, "an RSA key's modulus in bits");
}

{
  const proto = crypto.SubtleCrypto.prototype;
  // Every async method: all of them may run on the blocking threads.
  const methods = [
    "digest", "encrypt", "decrypt", "sign", "verify", "deriveBits", "deriveKey",
    "importKey", "exportKey", "generateKey", "getPublicKey", "wrapKey", "unwrapKey",
    "encapsulateBits", "encapsulateKey", "decapsulateBits", "decapsulateKey",
  ];
  for (let i = 0; i < methods.length; i++) {
    const method = methods[i];
    const descriptor = ObjectGetOwnPropertyDescriptor(proto, method);
    if (descriptor === undefined || typeof descriptor.value !== "function") continue;
    const original = descriptor.value;
    const bounded = {
      async [method](...args) {
        args = boundedCryptoArgs(method, args);
        const wait = cryptoTurn();
        if (wait !== undefined) await wait;
        try {
          const result = await ReflectApply(original, this, args);
          if (method === "importKey" || method === "unwrapKey") checkImportedKey(result);
          return result;
        } finally {
          cryptoDone();
        }
      },
    }[method];
    ObjectDefineProperty(bounded, "length", { value: original.length });
    descriptor.value = bounded;
    ObjectDefineProperty(proto, method, descriptor);
  }
}
const formData = core.loadExtScript("ext:deno_fetch/21_formdata.js");
const body = core.loadExtScript("ext:deno_fetch/22_body.js");
const request = core.loadExtScript("ext:deno_fetch/23_request.js");
// deno_fetch traces through Deno's OpenTelemetry module, which Atoll does
// not ship: give it a tracer that is always off.
internals.__telemetry ??= {
  TRACING_ENABLED: false,
  PROPAGATORS: [],
  DID_NOT_ENTER: Symbol("atoll.telemetry.off"),
  builtinTracer() {
    return undefined;
  },
  ContextManager: { active: () => undefined },
  enterSpan() {
    return undefined;
  },
  exitSpan() {},
  restoreSnapshot() {},
};
internals.__telemetryUtil ??= {
  updateSpanFromClientResponse() {},
  updateSpanFromError() {},
  updateSpanFromRequest() {},
};
const response = core.loadExtScript("ext:deno_fetch/23_response.js");
const fetchMod = core.loadExtScript("ext:deno_fetch/26_fetch.js");

// ---------------------------------------------------------------------------
// Console: every line goes to the host tagged with the request it belongs to.

/**
 * Marks what runs for one request. Set as V8's continuation-preserved data
 * while its handler runs, so promise continuations and timers created then
 * carry it. Cheaper than `core.AsyncVariable` (no null-prototype copy, no
 * WeakMap entry per request), and compatible with it: an AsyncVariable
 * entered later spreads this object's own `atollRequest` into its mapping.
 */
class RequestScope {
  // A field, so the property is defined, not assigned: a setter tenant
  // code put on Object.prototype never sees the scope.
  atollRequest;
  constructor(id) {
    this.atollRequest = id;
  }
}

/** The id of the request whose handler (or its continuations) is running, or 0. */
function currentRequestId() {
  const scope = core.getAsyncContext();
  // Own properties only: tenant code may put getters on Object.prototype.
  if (scope === undefined || scope === null || !ObjectHasOwn(scope, "atollRequest")) return 0;
  return scope.atollRequest;
}

// ---------------------------------------------------------------------------
// Outbound fetch: the host counts each request's subrequests and open
// fetches. Which addresses may be reached is decided in Rust, on every
// redirect hop, where tenant code cannot interfere.

const innerFetch = fetchMod.fetch;
// Taken before tenant code runs, which may replace the prototype's method.
const ReadableStreamPrototypePipeThrough = streams.ReadableStreamPrototype.pipeThrough;
/**
 * Fetches waiting for a connection slot, by request id, oldest first. As on
 * Workers, a request may have 6 fetches waiting for their response head at
 * once; more wait here (rather than fail) until one of those has its head.
 */
const slotQueues = new SafeMap();

/** `fetch()` as handlers see it. */
function fetch(input, init = undefined) {
  const id = currentRequestId();
  if (!MapPrototypeHas(slotQueues, id)) {
    const started = startFetch(id, input, init);
    if (started !== undefined) return started;
  }
  return waitForSlot(id, input, init);
}

/**
 * Starts a fetch for request `id`; undefined, having started nothing, when
 * all of the request's connection slots are waiting for a response head.
 */
function startFetch(id, input, init) {
  const refusal = op_atoll_fetch_begin(id);
  if (refusal === SLOTS_FULL) return undefined;
  if (refusal !== "") return PromiseReject(new TypeError(refusal));
  let pending;
  try {
    pending = innerFetch(input, init);
  } catch (e) {
    endFetch(id, -1);
    return PromiseReject(e);
  }
  return PromisePrototypeThen(
    pending,
    (response) => {
      // From the inner response: Response.prototype and Headers.prototype
      // are the tenant's to replace.
      const declared = headers.getHeader(toInnerResponse(response).headerList, "content-length");
      const refused = endFetch(id, declared === null ? -1 : NumberParseFloat(declared));
      if (refused !== "") {
        response.body?.cancel();
        throw new TypeError(refused);
      }
      // A declared length is what arrives (the client holds the server to
      // it); without one, the body is counted as it is read.
      if (declared === null) limitResponseBody(response);
      return response;
    },
    (e) => {
      endFetch(id, -1);
      throw withCause(e);
    },
  );
}

/** What `op_atoll_fetch_begin` answers when every slot is taken. */
const SLOTS_FULL = "slots full";

/** Ends a fetch of request `id`; its slot goes to the oldest waiting one. */
function endFetch(id, declaredLength) {
  const refused = op_atoll_fetch_end(id, declaredLength);
  const queue = MapPrototypeGet(slotQueues, id);
  // Start waiting fetches while slots are free (one refused by another
  // limit takes none).
  while (queue !== undefined && queue.length > 0) {
    const next = ArrayPrototypeShift(queue);
    const started = startFetch(id, next.input, next.init);
    if (started === undefined) {
      ArrayPrototypeUnshift(queue, next);
      break;
    }
    FunctionPrototypeCall(signalRemove, next.signal, next.onAbort);
    next.resolve(started);
  }
  if (queue?.length === 0 && MapPrototypeGet(slotQueues, id) === queue) {
    MapPrototypeDelete(slotQueues, id);
  }
  return refused;
}

// Taken before tenant code runs, which may replace them.
const requestSignal = ObjectGetOwnPropertyDescriptor(request.RequestPrototype, "signal").get;
const signalAborted = ObjectGetOwnPropertyDescriptor(
  abortSignal.AbortSignalPrototype,
  "aborted",
).get;
const signalReason = ObjectGetOwnPropertyDescriptor(abortSignal.AbortSignalPrototype, "reason").get;
const signalAdd = abortSignal.AbortSignalPrototype[abortSignal.add];
const signalRemove = abortSignal.AbortSignalPrototype[abortSignal.remove];

/**
 * Queues a fetch of request `id` until one of its slots frees; rejects at
 * once if its signal aborts meanwhile. The Request is made now, as fetch()
 * does, so later changes to `input` or `init` do not reach it.
 */
function waitForSlot(id, input, init) {
  let req;
  try {
    req = new request.Request(input, init);
  } catch (e) {
    return PromiseReject(e);
  }
  const signal = FunctionPrototypeCall(requestSignal, req);
  if (FunctionPrototypeCall(signalAborted, signal)) {
    return PromiseReject(FunctionPrototypeCall(signalReason, signal));
  }
  let queue = MapPrototypeGet(slotQueues, id);
  if (queue === undefined) {
    // No prototype: pushing and shifting then meet no setters tenant code
    // may have put on Array.prototype.
    queue = ObjectSetPrototypeOf([], null);
    MapPrototypeSet(slotQueues, id, queue);
  }
  return new Promise((resolve, reject) => {
    const waiter = { __proto__: null, input: req, init: undefined, resolve, signal, onAbort: null };
    waiter.onAbort = () => {
      const at = ArrayPrototypeIndexOf(queue, waiter);
      if (at === -1) return;
      ArrayPrototypeSplice(queue, at, 1);
      if (queue.length === 0 && MapPrototypeGet(slotQueues, id) === queue) {
        MapPrototypeDelete(slotQueues, id);
      }
      reject(FunctionPrototypeCall(signalReason, signal));
    };
    FunctionPrototypeCall(signalAdd, signal, waiter.onAbort);
    ArrayPrototypePush(queue, waiter);
  });
}

/**
 * Makes `response`'s body (one a server streams without declaring its
 * length) fail with a TypeError once more than the per-request response
 * limit has arrived; the upstream connection is then closed.
 */
function limitResponseBody(response) {
  const inner = toInnerResponse(response);
  const stream = inner?.body?.streamOrStatic;
  if (!isReadableStream(stream)) return;
  const limit = op_atoll_fetch_response_limit();
  let seen = 0;
  const counted = new streams.TransformStream({
    transform(chunk, controller) {
      seen += TypedArrayPrototypeGetByteLength(chunk);
      if (seen > limit) {
        controller.error(
          new TypeError(
            `the response body is larger than the limit of ${limit} bytes`,
          ),
        );
        return;
      }
      controller.enqueue(chunk);
    },
  });
  inner.body = new InnerBody(
    FunctionPrototypeCall(ReadableStreamPrototypePipeThrough, stream, counted),
  );
}

/**
 * deno_fetch rejects with "fetch failed" and hides the reason (a refused
 * address, a DNS failure) in `cause`: put it in the message handlers log.
 */
function withCause(e) {
  const cause = e?.cause?.message;
  if (!ObjectPrototypeIsPrototypeOf(TypeErrorPrototype, e) || typeof cause !== "string") {
    return e;
  }
  const refused = StringPrototypeIndexOf(cause, "fetch() to ");
  const reason = refused >= 0 ? StringPrototypeSlice(cause, refused) : cause;
  return new TypeError(`${e.message}: ${reason}`, { cause: e.cause });
}

// Tenant output goes to logs and JSON, never a terminal: no ANSI colors.
consoleMod.setNoColorFns(() => true, () => true);
const tenantConsole = new consoleMod.Console((msg, level) => {
  // Console levels: 0 debug, 1 log/info, 2 warn, 3 error. Drop the trailing
  // newline the formatter adds; the host prints lines.
  const text = StringPrototypeEndsWith(msg, "\n")
    ? StringPrototypeSlice(msg, 0, -1)
    : msg;
  op_atoll_log(level, currentRequestId(), text);
});

// ---------------------------------------------------------------------------
// Service-worker form: addEventListener("fetch", (e) => e.respondWith(...)).

const fetchListeners = [];

class FetchEvent extends event.Event {
  #request;
  #response = null;
  #waitUntil;

  constructor(type, init) {
    super(type);
    this.#request = init.request;
    this.#waitUntil = init.waitUntil;
  }

  get request() {
    return this.#request;
  }

  respondWith(r) {
    if (this.#response !== null) {
      throw new DOMException(
        "respondWith() was already called",
        "InvalidStateError",
      );
    }
    this.#response = PromiseResolve(r);
  }

  waitUntil(p) {
    this.#waitUntil(p);
  }

  passThroughOnException() {}

  get responded() {
    return this.#response;
  }
}

function addEventListener(type, listener) {
  if (type === "fetch" && listener !== null && listener !== undefined) {
    ArrayPrototypePush(fetchListeners, listener);
  }
}

function removeEventListener(type, listener) {
  if (type !== "fetch") return;
  const i = fetchListeners.indexOf(listener);
  if (i >= 0) fetchListeners.splice(i, 1);
}

// ---------------------------------------------------------------------------
// Global scope, as in Workers / Deno: web platform APIs only.

ObjectDefineProperties(globalThis, {
  AbortController: core.propNonEnumerable(abortSignal.AbortController),
  AbortSignal: core.propNonEnumerable(abortSignal.AbortSignal),
  Blob: core.propNonEnumerable(file.Blob),
  ByteLengthQueuingStrategy: core.propNonEnumerable(
    streams.ByteLengthQueuingStrategy,
  ),
  CompressionStream: core.propNonEnumerable(compression.CompressionStream),
  CountQueuingStrategy: core.propNonEnumerable(streams.CountQueuingStrategy),
  CryptoKey: core.propNonEnumerable(crypto.CryptoKey),
  CustomEvent: core.propNonEnumerable(event.CustomEvent),
  DecompressionStream: core.propNonEnumerable(compression.DecompressionStream),
  DOMException: core.propNonEnumerable(DOMException),
  ErrorEvent: core.propNonEnumerable(event.ErrorEvent),
  Event: core.propNonEnumerable(event.Event),
  EventTarget: core.propNonEnumerable(event.EventTarget),
  FetchEvent: core.propNonEnumerable(FetchEvent),
  File: core.propNonEnumerable(file.File),
  FormData: core.propNonEnumerable(formData.FormData),
  Headers: core.propNonEnumerable(headers.Headers),
  MessageChannel: core.propNonEnumerable(messagePort.MessageChannel),
  MessageEvent: core.propNonEnumerable(event.MessageEvent),
  MessagePort: core.propNonEnumerable(messagePort.MessagePort),
  Performance: core.propNonEnumerable(performance.Performance),
  PerformanceEntry: core.propNonEnumerable(performance.PerformanceEntry),
  PerformanceMark: core.propNonEnumerable(performance.PerformanceMark),
  PerformanceMeasure: core.propNonEnumerable(performance.PerformanceMeasure),
  PromiseRejectionEvent: core.propNonEnumerable(event.PromiseRejectionEvent),
  ReadableByteStreamController: core.propNonEnumerable(
    streams.ReadableByteStreamController,
  ),
  ReadableStream: core.propNonEnumerable(streams.ReadableStream),
  ReadableStreamBYOBReader: core.propNonEnumerable(
    streams.ReadableStreamBYOBReader,
  ),
  ReadableStreamBYOBRequest: core.propNonEnumerable(
    streams.ReadableStreamBYOBRequest,
  ),
  ReadableStreamDefaultController: core.propNonEnumerable(
    streams.ReadableStreamDefaultController,
  ),
  ReadableStreamDefaultReader: core.propNonEnumerable(
    streams.ReadableStreamDefaultReader,
  ),
  Request: core.propNonEnumerable(request.Request),
  Response: core.propNonEnumerable(response.Response),
  TextDecoder: core.propNonEnumerable(encoding.TextDecoder),
  TextDecoderStream: core.propNonEnumerable(encoding.TextDecoderStream),
  TextEncoder: core.propNonEnumerable(encoding.TextEncoder),
  TextEncoderStream: core.propNonEnumerable(encoding.TextEncoderStream),
  TransformStream: core.propNonEnumerable(streams.TransformStream),
  TransformStreamDefaultController: core.propNonEnumerable(
    streams.TransformStreamDefaultController,
  ),
  URL: core.propNonEnumerable(url.URL),
  URLPattern: core.propNonEnumerable(urlPattern.URLPattern),
  URLSearchParams: core.propNonEnumerable(url.URLSearchParams),
  WritableStream: core.propNonEnumerable(streams.WritableStream),
  WritableStreamDefaultController: core.propNonEnumerable(
    streams.WritableStreamDefaultController,
  ),
  WritableStreamDefaultWriter: core.propNonEnumerable(
    streams.WritableStreamDefaultWriter,
  ),
  addEventListener: core.propWritable(addEventListener),
  atob: core.propWritable(base64.atob),
  btoa: core.propWritable(base64.btoa),
  clearInterval: core.propWritable(timers.clearInterval),
  clearTimeout: core.propWritable(timers.clearTimeout),
  console: core.propNonEnumerable(tenantConsole),
  // A getter: the Crypto object is cppgc-backed and cannot live in a snapshot.
  crypto: core.propGetterOnly(() => crypto.crypto),
  Crypto: core.propNonEnumerable(crypto.Crypto),
  SubtleCrypto: core.propNonEnumerable(crypto.SubtleCrypto),
  fetch: core.propWritable(fetch),
  performance: core.propWritable(performance.performance),
  queueMicrotask: core.propWritable(core.queueMicrotask),
  removeEventListener: core.propWritable(removeEventListener),
  reportError: core.propWritable(event.reportError),
  self: core.propGetterOnly(() => globalThis),
  setInterval: core.propWritable(timers.setInterval),
  setTimeout: core.propWritable(timers.setTimeout),
  structuredClone: core.propWritable(structuredCloneMod.structuredClone),
  [webidl.brand]: core.propNonEnumerable(webidl.brand),
});

// ---------------------------------------------------------------------------
// Dispatch.

const { InnerBody } = body;
const {
  readableStreamForRid,
  isReadableStream,
  getReadableStreamResourceBacking,
  isReadableStreamDisturbed,
  readableStreamClose,
  readableStreamDisturb,
} = streams;
const { BadResourcePrototype } = core;

// Taken before tenant code runs, which may replace them.
const ReadableStreamPrototypeGetReader = streams.ReadableStreamPrototype.getReader;
const ReadableStreamPrototypeLocked = ObjectGetOwnPropertyDescriptor(
  streams.ReadableStreamPrototype,
  "locked",
).get;
const { fromInnerRequest } = request;

/** `HostInnerBody`'s stream slot before anything asked for the stream. */
const UNMATERIALIZED = { __proto__: null };

/**
 * An incoming request's body: the host's body resource, made a
 * ReadableStream only when something asks for one (`request.body`, a
 * clone, a proxied fetch), whereupon it behaves as deno_fetch's own. Read
 * whole first (`text()`, `json()`, `arrayBuffer()`...), it is taken with
 * one op: no stream, controller, reader or finalizer for the common POST.
 */
class HostInnerBody extends InnerBody {
  constructor(rid) {
    // InnerBody's constructor stores its argument through the setter below.
    super(UNMATERIALIZED);
    this.rid = rid;
    this.taken = false;
  }

  get streamOrStatic() {
    const current = this.materialized;
    return current === UNMATERIALIZED ? this.materialize() : current;
  }

  set streamOrStatic(value) {
    this.materialized = value;
  }

  /** The stream the body would have had all along. */
  materialize() {
    let stream;
    if (this.taken) {
      // Read whole already: a used, closed stream, as deno_fetch gives
      // for a consumed body.
      stream = new streams.ReadableStream();
      FunctionPrototypeCall(ReadableStreamPrototypeGetReader, stream);
      readableStreamDisturb(stream);
      readableStreamClose(stream);
    } else {
      stream = readableStreamForRid(this.rid);
    }
    this.materialized = stream;
    return stream;
  }

  unusable() {
    return this.materialized === UNMATERIALIZED ? this.taken : super.unusable();
  }

  consumed() {
    return this.materialized === UNMATERIALIZED ? this.taken : super.consumed();
  }

  consume() {
    if (this.materialized !== UNMATERIALIZED) return super.consume();
    if (this.taken) throw new TypeError("Body already consumed");
    this.taken = true;
    return readWholeBody(this.rid);
  }
}

/** Request body resource `rid` read to its end, then closed. */
async function readWholeBody(rid) {
  try {
    return await core.readAll(rid);
  } catch (e) {
    // As deno_fetch words it for a stream whose resource went away.
    if (ObjectPrototypeIsPrototypeOf(BadResourcePrototype, e)) {
      throw new TypeError("Cannot read body as underlying resource unavailable");
    }
    throw e;
  } finally {
    core.tryClose(rid);
  }
}

/** Request header names the host sends as an index into this list. */
const COMMON_REQUEST_HEADERS = op_atoll_common_request_headers();

/**
 * An incoming request's inner state, in the shape deno_fetch's `Request`
 * expects (the fields of its `newInnerRequest`). A class, so every request
 * shares one hidden class instead of defining accessors per object; headers
 * are fetched from the host only when the handler first reads them.
 */
class IncomingInnerRequest {
  constructor(id, method, url, body) {
    this.id = id;
    this.method = method;
    this.headerListInner = null;
    this.body = body;
    this.redirectMode = "follow";
    this.redirectCount = 0;
    this.urlValue = url;
    // The URL lists deno_fetch keeps are built only if something reads
    // them (cloning the request does): most handlers never do.
    this.urlListInner = null;
    this.urlListProcessedInner = null;
    this.clientRid = null;
    this.blobUrlEntry = null;
  }

  get headerList() {
    if (this.headerListInner === null) {
      let flat;
      try {
        flat = op_atoll_request_headers(this.id);
      } catch {
        throw new TypeError("Cannot read headers: request closed");
      }
      // Name, value, name, value...: paired here, where it is cheaper
      // than building the pairs with V8's API. A common name comes as its
      // index in COMMON_REQUEST_HEADERS.
      const list = [];
      for (let i = 0; i < flat.length; i += 2) {
        const name = flat[i];
        ArrayPrototypePush(list, [
          typeof name === "number" ? COMMON_REQUEST_HEADERS[name] : name,
          flat[i + 1],
        ]);
      }
      this.headerListInner = list;
    }
    return this.headerListInner;
  }

  set headerList(value) {
    this.headerListInner = value;
  }

  get urlList() {
    if (this.urlListInner === null) {
      const url = this.urlValue;
      this.urlListInner = [() => url];
    }
    return this.urlListInner;
  }

  set urlList(value) {
    this.urlListInner = value;
  }

  get urlListProcessed() {
    if (this.urlListProcessedInner === null) {
      this.urlListProcessedInner = [this.urlValue];
    }
    return this.urlListProcessedInner;
  }

  set urlListProcessed(value) {
    this.urlListProcessedInner = value;
  }

  url() {
    return this.urlListProcessedInner === null
      ? this.urlValue
      : this.urlListProcessedInner[0];
  }

  currentUrl() {
    if (this.urlListInner === null) return this.urlValue;
    const i = this.urlList.length - 1;
    const processed = this.urlListProcessed;
    if (processed[i] === undefined) {
      processed[i] = this.urlList[i]();
    }
    return processed[i];
  }
}

/** Reads an ExecutionContext's waitUntil promises (null if none). */
let waitUntilPromises;

/** The `ctx` handed to `fetch(request, env, ctx)`. */
class ExecutionContext {
  #pending = null;

  static {
    waitUntilPromises = (ctx) => ctx.#pending;
  }

  waitUntil(p) {
    if (this.#pending === null) this.#pending = [];
    ArrayPrototypePush(this.#pending, PromiseResolve(p));
  }

  passThroughOnException() {}
}
const {
  ResponsePrototype,
  responseBodyUsed,
  serveFastBodyKey,
  serveFastConsumedKey,
  serveFastContentTypeKey,
  serveFastHeaderKindKey,
  serveFastStatusKey,
  SERVE_FAST_HEADER_DEFAULT_TEXT,
  SERVE_FAST_HEADER_NONE,
  toInnerResponse,
} = response;

/** `export default { fetch }` of the tenant's entry module, if any. */
let moduleHandler = null;
/** The frozen `env` object handed to every `fetch(request, env, ctx)`. */
let env = ObjectFreeze({ __proto__: null });

/**
 * Formats an error for the host's log: message plus (source-mapped) stack.
 * Never throws, whatever getters the tenant put on the error.
 */
function formatError(e) {
  try {
    if (ObjectPrototypeIsPrototypeOf(ErrorPrototype, e)) {
      return String(e.stack ?? `${e.name}: ${e.message}`);
    }
    return `Uncaught (not an Error) ${consoleMod.inspect(e)}`;
  } catch {
    return "Uncaught error (it could not be formatted)";
  }
}

function invokeHandler(req, ctx) {
  if (moduleHandler !== null) {
    return FunctionPrototypeCall(moduleHandler.fetch, moduleHandler, req, env, ctx);
  }
  const ev = new FetchEvent("fetch", { request: req, waitUntil: (p) => ctx.waitUntil(p) });
  for (let i = 0; i < fetchListeners.length; i++) {
    const l = fetchListeners[i];
    if (typeof l === "function") FunctionPrototypeCall(l, globalThis, ev);
    else if (l && typeof l.handleEvent === "function") l.handleEvent(ev);
  }
  if (ev.responded === null) {
    throw new TypeError(
      "no \"fetch\" event listener called event.respondWith()",
    );
  }
  return ev.responded;
}

/** What `op_atoll_body_try_write` did with a chunk (as ops.rs numbers it). */
const CHUNK_SENT = 0;
const CHUNK_WAIT = 1;

/** Writes `stream`'s chunks as request `id`'s response body, then ends it. */
async function streamBody(id, stream) {
  const reader = stream.getReader();
  try {
    while (true) {
      const { value, done } = await reader.read();
      if (done) break;
      let chunk = value;
      if (typeof chunk === "string") chunk = core.encode(chunk);
      if (!ObjectPrototypeIsPrototypeOf(Uint8ArrayPrototype, chunk)) {
        throw new TypeError(
          "a response body stream must produce Uint8Array chunks",
        );
      }
      if (TypedArrayPrototypeGetByteLength(chunk) === 0) continue;
      // Sent at once while the client's buffer has room; waited for when
      // it is full (the producer is paused meanwhile).
      const sent = op_atoll_body_try_write(id, chunk);
      const open = sent === CHUNK_SENT ||
        (sent === CHUNK_WAIT && await op_atoll_body_write(id, chunk));
      if (!open) {
        // The client went away: tell the producer.
        await reader.cancel("client disconnected");
        await op_atoll_body_close(id, null);
        return;
      }
    }
    if (!op_atoll_body_try_close(id)) await op_atoll_body_close(id, null);
  } catch (e) {
    // The head is already out: the client sees a cut body, the log the error.
    tenantConsole.error("Uncaught (in response body stream)", e);
    await op_atoll_body_close(id, formatError(e));
  }
}

const EMPTY = new Uint8Array(0);

/**
 * Content types the host keeps ready-made, in the order of header_list.rs's
 * COMMON_VALUES: a response whose only header is one of them passes its
 * index instead of two strings.
 */
const COMMON_CONTENT_TYPES = [
  "text/plain;charset=UTF-8",
  "application/json",
  "text/html;charset=UTF-8",
  "text/html; charset=utf-8",
];

/** The index of `name: value` in COMMON_CONTENT_TYPES, or -1. */
function commonContentType(name, value) {
  if (name !== "Content-Type" && name !== "content-type") return -1;
  for (let i = 0; i < COMMON_CONTENT_TYPES.length; i++) {
    if (value === COMMON_CONTENT_TYPES[i]) return i;
  }
  return -1;
}

/**
 * The rest of a header list from entry `from` on, as the respond ops take
 * it: "name\0value\0name\0value". The host reads one string instead of
 * walking arrays, and whatever accessors a tenant planted on the list run
 * here, in JS, not inside an op.
 */
function joinHeaderList(list, from) {
  const n = list.length;
  if (n <= from) return "";
  let joined = list[from][0] + "\0" + list[from][1];
  for (let i = from + 1; i < n; i++) joined += "\0" + list[i][0] + "\0" + list[i][1];
  return joined;
}

/** What `sendResponse` returns when it also finished the request. */
const FINISHED = Symbol("finished");

/** Most bytes of header names and values one response may carry (as in header_list.rs). */
const MAX_HEADER_BYTES = 1024 * 1024;

/**
 * Whether deno_fetch marked `resp` as a plain static response: status 200,
 * a string or bytes body and at most a content type, as `new
 * Response("text")` and `Response.json(data)` make. Reading its headers
 * drops the mark.
 */
function isFastStatic(resp) {
  const body = resp[serveFastBodyKey];
  return resp[serveFastStatusKey] === 200 && body !== null && body !== undefined;
}

/**
 * Sends a response `isFastStatic` accepted straight from the fields
 * deno_fetch set, without building its inner body and header list as
 * `toInnerResponse` would (about a sixth of a hello-world request's
 * garbage). `done` as for `sendResponse`.
 */
function sendFastStatic(id, resp, ctx) {
  if (responseBodyUsed(resp)) {
    throw new TypeError("the response body was already used");
  }
  resp[serveFastConsumedKey] = true;
  const body = resp[serveFastBodyKey];
  const kind = resp[serveFastHeaderKindKey];
  let name = "";
  let value = "";
  if (kind === SERVE_FAST_HEADER_DEFAULT_TEXT) {
    name = "content-type";
    value = COMMON_CONTENT_TYPES[0];
  } else if (kind !== SERVE_FAST_HEADER_NONE) {
    name = "content-type";
    value = "" + resp[serveFastContentTypeKey];
  }
  // Read last: the fields above are own properties a tenant could redefine.
  const done = ctx !== null && waitUntilPromises(ctx) === null;
  respondFull(id, 200, name, value, "", body, done);
  return done ? FINISHED : undefined;
}

/**
 * Sends request `id`'s response with a body known in full, a string or
 * bytes; a lone common content type goes as its index.
 */
function respondFull(id, status, name, value, rest, body, done) {
  if (typeof body === "string") {
    const typed = rest === "" ? commonContentType(name, value) : -1;
    if (typed >= 0) {
      if (fastRespondTextTyped !== null) {
        fastRespondTextTyped(id, status, typed, body, done);
      } else {
        op_atoll_respond_text_typed(id, status, typed, body, done);
      }
    } else {
      if (fastRespondText !== null) {
        fastRespondText(id, status, name, value, rest, body, done);
      } else {
        op_atoll_respond_text(id, status, name, value, rest, body, done);
      }
    }
  } else {
    op_atoll_respond(id, status, name, value, rest, body, done);
  }
}

/**
 * Sends `resp` as request `id`'s response. Returns a promise while a
 * streamed body is still being written, otherwise undefined. Given the
 * request's `ctx`, a body known in full also finishes the request when no
 * waitUntil work exists (then it returns FINISHED).
 */
function sendResponse(id, resp, ctx = null) {
  if (!ObjectPrototypeIsPrototypeOf(ResponsePrototype, resp)) {
    throw new TypeError(
      `the handler returned ${
        resp === null ? "null" : typeof resp
      } instead of a Response`,
    );
  }
  if (isFastStatic(resp)) return sendFastStatic(id, resp, ctx);
  const inner = toInnerResponse(resp);
  if (inner.type === "error") {
    throw new TypeError("the handler returned Response.error()");
  }
  const status = inner.status;
  // The first header, usually the only one, goes as its own two strings:
  // no string is built for it (see header_list.rs).
  const list = inner.headerList;
  let name = "";
  let value = "";
  if (list.length > 0) {
    name = "" + list[0][0];
    value = "" + list[0][1];
  }
  const rest = joinHeaderList(list, 1);
  // Checked here too, before the op copies the strings out of the V8 heap.
  if (name.length + value.length + rest.length > MAX_HEADER_BYTES) {
    throw new TypeError(
      `the response headers are larger than the ${MAX_HEADER_BYTES} bytes allowed`,
    );
  }
  // Read after the list was joined: accessors on it may have called waitUntil.
  const done = ctx !== null && waitUntilPromises(ctx) === null;
  if (inner.body === null) {
    op_atoll_respond(id, status, name, value, rest, EMPTY, done);
    return done ? FINISHED : undefined;
  }
  const src = inner.body.streamOrStatic;
  if (!isReadableStream(src)) {
    if (src.consumed) throw new TypeError("the response body was already used");
    src.consumed = true;
    respondFull(id, status, name, value, rest, src.body, done);
    return done ? FINISHED : undefined;
  }
  // A body backed by a host resource (a fetch() response's, the request's
  // own) that nothing has read yet: the host pipes it without JS per chunk.
  const backing = getReadableStreamResourceBacking(src);
  if (
    backing !== undefined && backing !== null &&
    !FunctionPrototypeCall(ReadableStreamPrototypeLocked, src) &&
    !isReadableStreamDisturbed(src)
  ) {
    op_atoll_respond_resource(id, status, name, value, rest, backing.rid, backing.autoClose);
    // The stream's data now goes to the client: nothing else may read it.
    readableStreamDisturb(src);
    FunctionPrototypeCall(ReadableStreamPrototypeGetReader, src);
    return undefined;
  }
  op_atoll_respond_stream(id, status, name, value, rest);
  return streamBody(id, src);
}

/** Sends the handler's response, then waits for its waitUntil work. */
async function finish(id, result, ctx) {
  try {
    const streaming = sendResponse(id, await result);
    if (streaming !== undefined) await streaming;
  } catch (e) {
    op_atoll_respond_error(id, formatError(e));
  }
  await settleWaitUntil(id, ctx);
}

/** Waits for request `id`'s waitUntil work, then marks it done. */
async function settleWaitUntil(id, ctx) {
  // waitUntil() may be called again while earlier promises settle.
  let settled = 0;
  let pending = waitUntilPromises(ctx);
  while (pending !== null && settled < pending.length) {
    const batch = ArrayPrototypeSlice(pending, settled);
    settled = pending.length;
    const outcomes = await SafePromiseAllSettled(batch);
    for (let i = 0; i < outcomes.length; i++) {
      if (outcomes[i].status === "rejected") {
        tenantConsole.error(
          "ctx.waitUntil() promise rejected:",
          outcomes[i].reason,
        );
      }
    }
    pending = waitUntilPromises(ctx);
  }
  op_atoll_request_done(id);
}

/**
 * Whether `resp` has a ReadableStream body. Those keep going through
 * `finish`, as before the inline path existed: that path was built and
 * measured for bodies known in full only.
 */
function hasStreamBody(resp) {
  if (isFastStatic(resp)) return false;
  const inner = toInnerResponse(resp);
  return inner.body !== null && isReadableStream(inner.body.streamOrStatic);
}

/**
 * Runs request `id` (called by the host, once per request): builds the
 * Request, calls the handler, and answers it at once if the handler
 * returned a Response, or starts `finish` when it returned a promise.
 * Work a synchronous handler queues as a microtask runs after the request
 * is answered: a waitUntil call from there is too late to keep it open.
 */
function handle(id, method, url, bodyRid) {
  const reqBody = bodyRid === null
    ? null
    : new HostInnerBody(bodyRid);
  const req = fromInnerRequest(
    new IncomingInnerRequest(id, method, url, reqBody),
    "immutable",
  );
  const ctx = new ExecutionContext();
  const previous = core.getAsyncContext();
  core.setAsyncContext(new RequestScope(id));
  try {
    let result;
    try {
      result = invokeHandler(req, ctx);
    } catch (e) {
      result = PromiseReject(e);
    }
    // The common handler returns its Response synchronously and queues no
    // waitUntil work: answer and finish it right here, without an async
    // function and a microtask turn.
    if (
      waitUntilPromises(ctx) === null &&
      ObjectPrototypeIsPrototypeOf(ResponsePrototype, result) &&
      !hasStreamBody(result)
    ) {
      let sent;
      try {
        sent = sendResponse(id, result, ctx);
      } catch (e) {
        op_atoll_respond_error(id, formatError(e));
        op_atoll_request_done(id);
        return;
      }
      if (sent !== FINISHED) settleWaitUntil(id, ctx);
      return;
    }
    finish(id, PromiseResolve(result), ctx);
  } finally {
    core.setAsyncContext(previous);
  }
}

/**
 * Requests an isolate serves before `bindFastCalls`: an idle tenant's
 * isolate never pays its memory, a busy one soon has the fast calls.
 */
let requestsBeforeFastCalls = 1000;

/**
 * The host's entry point: runs the requests of one poll, `batch` holding
 * [method, url, has body] for each, from entry `from` on. The host asks
 * itself before each one starts (its CPU accounting and time slice): when
 * `op_atoll_next_request` answers 0, the rest wait for a later poll. One
 * call per batch instead of one per request spares V8's entry into JS for
 * each.
 */
function dispatchAll(batch, from) {
  if (requestsBeforeFastCalls > 0) {
    requestsBeforeFastCalls -= (batch.length - from) / 3;
    if (requestsBeforeFastCalls <= 0) {
      // The slow calls keep working: no request is failed over this.
      try {
        bindFastCalls();
      } catch {
        // Nothing to do.
      }
    }
  }
  for (let i = from; i < batch.length; i += 3) {
    const id = fastNextRequest !== null ? fastNextRequest() : op_atoll_next_request();
    if (id === 0) return;
    const bodyRid = !batch[i + 2]
      ? null
      : fastRequestBody !== null
      ? fastRequestBody(id)
      : op_atoll_request_body(id);
    dispatch(id, batch[i], batch[i + 1], bodyRid);
  }
}

/** Runs request `id`; anything it throws fails that request alone. */
function dispatch(id, method, url, bodyRid) {
  try {
    handle(id, method, url, bodyRid);
  } catch (e) {
    // Only a poisoned environment gets here; keep serving the others.
    op_atoll_respond_error(id, formatError(e));
    op_atoll_request_done(id);
  }
}

/**
 * Loads the tenant's entry module, finds its handler and starts serving.
 * Called once per isolate by the host, right after it was taken from the
 * pool.
 */
async function boot(entry, envJson, warmUp = false) {
  performance.setTimeOrigin();
  try {
    const parsedEnv = ObjectFreeze(JSONParse(envJson));
    const ns = await import(entry);
    // The warm-up sets nothing: a tenant's boot may already have begun.
    if (warmUp) return;
    env = parsedEnv;
    const def = ns.default;
    if (def !== null && def !== undefined && typeof def.fetch === "function") {
      moduleHandler = def;
    } else if (fetchListeners.length === 0) {
      throw new TypeError(
        `${entry} has no handler: export default { fetch(request, env, ctx) { ... } } ` +
          `or call addEventListener("fetch", ...)`,
      );
    }
  } catch (e) {
    if (!warmUp) op_atoll_boot_done(formatError(e));
    return;
  }
  if (!warmUp) op_atoll_boot_done(null);
}

/**
 * Prepares a pre-booted isolate before any tenant owns it: hides the
 * runtime's internals and warms the request path.
 */
function prepare() {
  // `Deno.core` and `__bootstrap` reach every op; tenants get neither.
  delete globalThis.Deno;
  delete globalThis.__bootstrap;
  warmUpRequestPath();
  warmUpDispatch();
  warmUpBoot();
}

/**
 * Rebinds the hot request ops to their fast-call versions. deno_core 0.413
 * bakes every op into the snapshot as a slow call (V8 cannot serialize
 * fast-call functions) and re-creates the fast ones, for all ops at once,
 * only when the isolate first loads a module the snapshot left out:
 * `fast_calls.js` is that module. Optimized code then calls the ops
 * without V8's API-callback frame and argument objects. The new functions
 * take about 10 KB of heap, so only a busy isolate gets them (see
 * `dispatchAll`).
 */
function bindFastCalls() {
  core.createLazyLoader("ext:atoll_api/fast_calls.js")();
  fastRespondText = core.ops.op_atoll_respond_text;
  fastRespondTextTyped = core.ops.op_atoll_respond_text_typed;
  fastNextRequest = core.ops.op_atoll_next_request;
  fastRequestBody = core.ops.op_atoll_request_body;
}

/**
 * Boots a tiny module the host serves to unassigned isolates, so a
 * tenant's boot does not pay for compiling `boot` and for the isolate's
 * first dynamic import, module instantiation and evaluation. The host
 * drives it to completion by polling the event loop. With `warmUp` set,
 * `boot` neither reports to the host nor installs a handler or env.
 */
function warmUpBoot() {
  boot("atoll:warm-up", "{}", true);
}

/**
 * Runs one request through the whole dispatch path in a pooled isolate, so
 * a tenant's first request does not pay for compiling dispatch, handle,
 * sendResponse and finish (their bytecode is not in the snapshot: they never
 * ran while it was built). Request id 0 is never a host request: the ops it
 * reaches find nothing to answer and do nothing.
 */
function warmUpDispatch() {
  // Once answered at once, once through `finish` (waitUntil work).
  moduleHandler = {
    fetch(req, _env, ctx) {
      if (req.url.endsWith("wait")) ctx.waitUntil(undefined);
      return new Response(`warm ${new URL(req.url).pathname} ${req.method}`);
    },
  };
  try {
    dispatch(0, "GET", "http://warmup.invalid/path?q=1", null);
    dispatch(0, "GET", "http://warmup.invalid/path?q=wait", null);
    // Nothing is queued for delivery: compiles the loop, starts nothing.
    dispatchAll(["GET", "http://warmup.invalid/", false], 0);
    // Settle `finish` now, not in the tenant's first turn of the event loop.
    core.runMicrotasks();
  } finally {
    moduleHandler = null;
  }
}

// The host calls `prepare` through this symbol once per isolate, before any
// tenant code runs, and keeps the two functions it returns: `boot` (called
// once, when a tenant takes the isolate) and `dispatchAll` (once per poll
// with requests).
// Neither is reachable from the global scope.
ObjectDefineProperty(globalThis, Symbol.for("atoll.prepare"), {
  value: () => {
    delete globalThis[Symbol.for("atoll.prepare")];
    prepare();
    return [boot, dispatchAll];
  },
  configurable: true,
  enumerable: false,
  writable: false,
});

// A rejection nobody handles, or an exception thrown from a timer, is the
// tenant's bug: log it under its request and keep the isolate serving.
core.setUnhandledPromiseRejectionHandler((_promise, reason) => {
  tenantConsole.error("Uncaught (in promise)", reason);
  return true;
});
core.setReportExceptionCallback((error) => {
  tenantConsole.error("Uncaught", error);
});

// Runs the request path once while the snapshot is built, so the bytecode of
// everything a first request touches (Request/Response/Headers construction,
// webidl conversions, URL parsing, body extraction) is in the snapshot and a
// tenant's first request does not pay for compiling it. No ops with host
// state are called and nothing created here outlives the snapshot.
function warmUpRequestPath() {
  const headerList = [["content-type", "text/plain"], ["x-warm", "1"]];
  const inner = new IncomingInnerRequest(0, "POST", "http://warmup.invalid/path?q=1", null);
  inner.headerList = headerList;
  const req = fromInnerRequest(inner, "immutable");
  const url = new URL(req.url);
  const seen = [req.method, url.pathname, url.searchParams.get("q"), req.headers.get("x-warm")];
  for (const [, v] of req.headers) seen.push(v);
  const responses = [
    new Response("hello"),
    new Response(`templated ${seen.length}`, {
      status: 201,
      headers: { "content-type": "text/plain; charset=utf-8", "x-a": "b" },
    }),
    Response.json({ ok: true, n: 1 }),
    new Response(new Uint8Array(1)),
    new Response(null, { status: 204 }),
    new Response(new ReadableStream()),
  ];
  for (let i = 0; i < responses.length; i++) {
    const resp = responses[i];
    resp.headers.get("content-type");
    const innerResp = toInnerResponse(resp);
    seen.push(innerResp.status, innerResp.headerList.length);
    if (innerResp.body !== null) {
      const src = innerResp.body.streamOrStatic;
      if (!isReadableStream(src) && typeof src.body === "string") {
        seen.push(core.encode(src.body).byteLength);
      }
    }
  }
  const h = new Headers({ a: "b" });
  h.set("c", "d");
  new TextDecoder().decode(new TextEncoder().encode("warm"));
  return seen.length;
}

/**
 * How many times the snapshot's build runs the request path. V8 sizes a
 * class's instances generously until its constructor has run eight times
 * ("in-object slack tracking"), then shrinks them to the fields actually
 * used; a class whose tracking is still open when the snapshot is taken
 * keeps the generous size in every isolate booted from it (only a full
 * collection, rare in a busy isolate, would end the tracking). Run once,
 * each hello-world request allocated 328 bytes for its
 * `IncomingInnerRequest` instead of 112, 216 for its Request instead of 88
 * and 546 for `new Response("hello")` instead of 370: 1.18 KB of garbage
 * per request instead of 0.69 (benches/gc_rate.sh, benches/README.md).
 */
const SLACK_TRACKING_ROUNDS = 10;
for (let i = 0; i < SLACK_TRACKING_ROUNDS; i++) warmUpRequestPath();
