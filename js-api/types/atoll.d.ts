// TypeScript declarations for Atoll handlers.
//
// Web platform types (Request, Response, ReadableStream, crypto, …) come
// from TypeScript's "dom" lib; these add what Atoll itself defines.
// Use: `/// <reference path="…/js-api/types/atoll.d.ts" />` or copy this file.

/** Passed to every `fetch` call; keeps work alive after the response. */
interface ExecutionContext {
  /** Keeps the request's isolate working on `promise` after the response is sent. */
  waitUntil(promise: Promise<unknown>): void;
  /** Accepted for compatibility; Atoll has no origin to fall back to. */
  passThroughOnException(): void;
}

/** The module-worker contract: `export default { fetch }`. */
interface ExportedHandler<Env = Record<string, string>> {
  fetch(
    request: Request,
    env: Env,
    ctx: ExecutionContext,
  ): Response | Promise<Response>;
}

/** The service-worker contract: `addEventListener("fetch", …)`. */
interface FetchEvent extends Event {
  readonly request: Request;
  respondWith(response: Response | Promise<Response>): void;
  waitUntil(promise: Promise<unknown>): void;
  passThroughOnException(): void;
}

declare function addEventListener(
  type: "fetch",
  listener: (event: FetchEvent) => void,
): void;
