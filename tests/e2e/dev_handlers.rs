//! Handler contract: module and service-worker forms, JS and TS, Web APIs,
//! errors.

use crate::harness::{Dev, client, get_text};

#[tokio::test]
async fn js_module_worker_sees_request_env_and_ctx() {
    let dev = Dev::start(
        &[(
            "worker.js",
            r#"
            let waited = 0;
            export default {
              async fetch(request, env, ctx) {
                const url = new URL(request.url);
                if (url.pathname === "/waited") return new Response(String(waited));
                if (url.pathname === "/bytes") {
                  return new Response(new Uint8Array([0, 1, 2, 255]), { status: 202 });
                }
                ctx.waitUntil(new Promise((r) => setTimeout(() => { waited++; r(); }, 10)));
                const body = request.method === "POST" ? await request.text() : "";
                return Response.json({
                  method: request.method,
                  path: url.pathname,
                  query: url.searchParams.get("q"),
                  header: request.headers.get("x-test"),
                  body,
                  greeting: env.GREETING,
                }, { status: 201, headers: { "x-handler": "js" } });
              },
            };
            "#,
        )],
        &["worker.js", "--var", "GREETING=hi there"],
    );
    let c = client();
    let resp = c
        .post(dev.url("/path/x?q=1"))
        .header("x-test", "yes")
        .body("payload")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 201);
    assert_eq!(resp.headers()["x-handler"], "js");
    assert_eq!(resp.headers()["content-type"], "application/json");
    let v: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(
        v,
        serde_json::json!({
            "method": "POST", "path": "/path/x", "query": "1", "header": "yes",
            "body": "payload", "greeting": "hi there"
        })
    );
    // A bytes body arrives byte for byte.
    let resp = c.get(dev.url("/bytes")).send().await.expect("request");
    assert_eq!(resp.status(), 202);
    assert_eq!(&resp.bytes().await.expect("body")[..], &[0u8, 1, 2, 255]);
    // waitUntil work outlives the response and runs to completion.
    let mut waited = String::new();
    for _ in 0..100 {
        waited = get_text(&c, &dev.url("/waited"), None).await;
        if waited == "1" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(waited, "1");
    // One log line per request.
    let log = dev.wait_for_log("GET /waited 200").await;
    assert!(log.contains("POST /path/x?q=1 201"), "{log}");
}

#[tokio::test]
async fn typescript_graph_with_js_and_json_imports() {
    let dev = Dev::start(
        &[
            (
                "src/main.ts",
                r#"
                import { greet } from "./lib/greet.ts";
                import { twice } from "./lib/math.js";
                import data from "./data.json" with { type: "json" };
                import type { Shape } from "./types.ts";

                interface Env { NAME: string }
                const shape: Shape = { sides: twice(data.base) };

                export default {
                  fetch(_req: Request, env: Env): Response {
                    console.log("typed log", shape.sides);
                    return new Response(`${greet(env.NAME)} ${shape.sides}`);
                  },
                } satisfies ExportedHandler<Env>;
                type ExportedHandler<E> = { fetch(r: Request, e: E): Response };
                "#,
            ),
            (
                "src/lib/greet.ts",
                "export function greet(name: string): string { return `hello ${name}`; }\n",
            ),
            ("src/lib/math.js", "export const twice = (n) => n * 2;\n"),
            ("src/data.json", r#"{ "base": 21 }"#),
            ("src/types.ts", "export interface Shape { sides: number }\n"),
        ],
        &["src/main.ts", "--var", "NAME=atoll"],
    );
    let body = get_text(&client(), &dev.url("/"), None).await;
    assert_eq!(body, "hello atoll 42");
    // console.log output is shown, tagged with tenant and request id.
    let log = dev.wait_for_log("typed log 42").await;
    let line = log
        .lines()
        .find(|l| l.contains("typed log 42"))
        .expect("console line");
    assert!(line.contains("tenant=\"main\""), "{line}");
    assert!(line.contains("request_id="), "{line}");
}

#[tokio::test]
async fn service_worker_form() {
    let dev = Dev::start(
        &[(
            "sw.js",
            r#"
            addEventListener("fetch", (event) => {
              event.waitUntil(Promise.resolve());
              event.respondWith((async () => {
                const n = await event.request.json();
                return new Response(`sum=${n.a + n.b}`, { headers: { "x-form": "sw" } });
              })());
            });
            "#,
        )],
        &["sw.js"],
    );
    let resp = client()
        .post(dev.url("/"))
        .body(r#"{"a":2,"b":3}"#)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.headers()["x-form"], "sw");
    assert_eq!(resp.text().await.expect("text"), "sum=5");
}

#[tokio::test]
async fn web_platform_apis() {
    let dev = Dev::start(
        &[(
            "apis.js",
            r#"
            export default {
              async fetch(request) {
                const out = {};
                const u = new URL("../b?x=1#h", "https://example.com/a/c");
                out.url = u.href;
                out.params = new URLSearchParams("a=1&a=2").getAll("a");
                const bytes = new TextEncoder().encode("héllo");
                out.encoded = bytes.length;
                out.decoded = new TextDecoder().decode(bytes);
                const original = { d: new Date(0), m: new Map([[1, { n: [1, 2] }]]) };
                const copy = structuredClone(original);
                out.cloneIsDeep = copy.m.get(1) !== original.m.get(1) && copy.m.get(1).n[1] === 2 &&
                  copy.d.getTime() === 0;
                const ac = new AbortController();
                let abortedWith = null;
                ac.signal.addEventListener("abort", () => { abortedWith = ac.signal.reason.name; });
                ac.abort();
                out.aborted = ac.signal.aborted && abortedWith === "AbortError";
                const req2 = request.clone();
                out.cloneBodies = [await request.text(), await req2.text()];
                out.b64 = btoa("atoll");
                out.digest = [...new Uint8Array(await crypto.subtle.digest("SHA-256", bytes))]
                  .slice(0, 4);
                out.uuid = typeof crypto.randomUUID() === "string";
                out.noDeno = typeof Deno === "undefined" && typeof __bootstrap === "undefined" &&
                  Object.getOwnPropertySymbols(globalThis).every((s) => !String(s).includes("atoll"));
                return Response.json(out);
              },
            };
            "#,
        )],
        &["apis.js"],
    );
    let v: serde_json::Value = client()
        .post(dev.url("/"))
        .body("twice")
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(v["url"], "https://example.com/b?x=1#h");
    assert_eq!(v["params"], serde_json::json!(["1", "2"]));
    assert_eq!(v["encoded"], 6);
    assert_eq!(v["decoded"], "héllo");
    assert_eq!(v["cloneIsDeep"], true);
    assert_eq!(v["aborted"], true);
    assert_eq!(v["cloneBodies"], serde_json::json!(["twice", "twice"]));
    assert_eq!(v["b64"], "YXRvbGw=");
    // sha256("héllo") starts with these bytes (checked with sha2 below).
    use sha2::Digest;
    let expected: Vec<u8> = sha2::Sha256::digest("héllo".as_bytes())[..4].to_vec();
    assert_eq!(v["digest"], serde_json::json!(expected));
    assert_eq!(v["uuid"], true);
    assert_eq!(
        v["noDeno"], true,
        "the Deno namespace must not leak to tenants"
    );
}

#[tokio::test]
async fn exceptions_give_500_without_internals_and_a_source_mapped_log() {
    let dev = Dev::start(
        &[(
            "boom.ts",
            // The throw is on line 6 of the .ts file; types before it shift
            // the emitted JS, so a correct line proves the source map works.
            "type Id = string;\ninterface Thing { id: Id; size: number }\nfunction check(t: Thing): void {\n  if (t.size > 1) {\n    // secret-internal-detail\n    throw new Error(`bad thing ${t.id}: secret-internal-detail`);\n  }\n}\nexport default {\n  fetch(req: Request): Response {\n    if (new URL(req.url).pathname === '/reject') {\n      Promise.reject(new Error('nobody listens'));\n      return new Response('still fine');\n    }\n    check({ id: 'x', size: 2 });\n    return new Response('unreachable');\n  },\n};\n",
        )],
        &["boom.ts"],
    );
    let c = client();
    let resp = c.get(dev.url("/")).send().await.expect("request");
    assert_eq!(resp.status(), 500);
    let rid = resp.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_string();
    let body = resp.text().await.expect("text");
    assert!(!body.contains("secret"), "internals leaked: {body}");
    assert!(body.contains(&rid), "{body}");
    let log = dev.wait_for_log("secret-internal-detail").await;
    let line = log
        .lines()
        .find(|l| l.contains("GET / 500"))
        .expect("request log line");
    assert!(line.contains(&rid), "{line}");
    assert!(line.contains("tenant=boom"), "{line}");
    assert!(
        log.contains("boom.ts:6:"),
        "stack must point at the .ts line: {log}"
    );

    // An unhandled rejection is logged and does not take the isolate down.
    let resp = c.get(dev.url("/reject")).send().await.expect("request");
    assert_eq!(resp.text().await.expect("text"), "still fine");
    dev.wait_for_log("nobody listens").await;
}

#[tokio::test]
async fn startup_errors_are_reported() {
    let dev = Dev::start(
        &[
            (
                "bad.js",
                "throw new Error('top-level failure');\nexport default {};\n",
            ),
            ("nohandler.js", "export const x = 1;\n"),
        ],
        &["bad.js", "other.local=nohandler.js"],
    );
    let c = client();
    let resp = c.get(dev.url("/")).send().await.expect("request");
    assert_eq!(resp.status(), 500);
    assert!(!resp.text().await.expect("text").contains("top-level"));
    dev.wait_for_log("top-level failure").await;

    let resp = c
        .get(dev.url("/"))
        .header("host", "other.local")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 500);
    dev.wait_for_log("has no handler").await;
}

#[tokio::test]
async fn tenants_cannot_set_framing_headers_or_block_the_thread() {
    let dev = Dev::start(
        &[(
            "frame.js",
            r#"
            export default {
              fetch(request) {
                if (new URL(request.url).pathname === "/wait") {
                  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0);
                  return new Response("waited");
                }
                // A lying content-length would let this body smuggle a
                // second response onto a keep-alive connection.
                return new Response("hello world\r\n\r\nHTTP/1.1 200 OK\r\n\r\nsmuggled", {
                  headers: { "content-length": "5", "connection": "close", "x-kept": "yes" },
                });
              },
            };
            "#,
        )],
        &["frame.js"],
    );
    let c = client();
    for _ in 0..2 {
        let resp = c.get(dev.url("/")).send().await.expect("request");
        assert_eq!(resp.headers()["x-kept"], "yes");
        assert!(resp.headers().get("connection").is_none());
        let len: usize = resp.headers()["content-length"]
            .to_str()
            .expect("ascii")
            .parse()
            .expect("number");
        let body = resp.text().await.expect("text");
        assert_eq!(len, body.len());
        assert!(body.ends_with("smuggled"), "{body}");
    }
    // Atomics.wait is refused instead of freezing the worker thread.
    let resp = c.get(dev.url("/wait")).send().await.expect("request");
    assert_eq!(resp.status(), 500);
    let resp = c.get(dev.url("/")).send().await.expect("request");
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn hostile_response_header_lists_get_a_500_not_a_crash() {
    let dev = Dev::start(
        &[(
            "headers.js",
            r#"
            export default {
              fetch(request) {
                const path = new URL(request.url).pathname;
                // The internal header list is reachable through the
                // Response's symbol-keyed slot: replace it. (Status 201: a
                // plain 200 text response is sent from deno_fetch's static
                // fields, without reading the list.)
                const withList = (list) => {
                  const resp = new Response("body text that must arrive intact", { status: 201 });
                  for (const sym of Object.getOwnPropertySymbols(resp)) {
                    const inner = resp[sym];
                    if (inner && Array.isArray(inner.headerList)) inner.headerList = list;
                  }
                  return resp;
                };
                if (path === "/many") {
                  // More distinct names than a header map can hold.
                  return withList(Array.from({ length: 30000 }, (_, i) => [`x-h${i}`, "v"]));
                }
                if (path === "/accessor") {
                  // Accessors run (and allocate) while the host reads the list.
                  return withList([{
                    get 0() { globalThis.junk = new Array(100000).fill("x").join(""); return "x-a"; },
                    get 1() { return "v"; },
                  }]);
                }
                return new Response("fine");
              },
            };
            "#,
        )],
        &["headers.js"],
    );
    let c = client();
    let resp = c.get(dev.url("/many")).send().await.expect("request");
    assert_eq!(resp.status(), 500);
    // Whatever the accessor case answers, the node must survive it intact.
    let resp = c.get(dev.url("/accessor")).send().await.expect("request");
    if resp.status() == 201 {
        assert_eq!(
            resp.text().await.expect("text"),
            "body text that must arrive intact"
        );
    }
    let resp = c.get(dev.url("/")).send().await.expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.expect("text"), "fine");
}

#[tokio::test]
async fn static_responses_keep_their_headers_and_body_rules() {
    let dev = Dev::start(
        &[(
            "static.js",
            r#"
            export default {
              async fetch(request) {
                const path = new URL(request.url).pathname;
                if (path === "/text") return new Response("plain");
                if (path === "/empty") return new Response("");
                if (path === "/json") return Response.json({ a: 1 });
                if (path === "/bytes") return new Response(new Uint8Array([104, 105]));
                if (path === "/html") {
                  return new Response("<p>", { headers: { "content-type": "text/html; charset=utf-8" } });
                }
                if (path === "/edited") {
                  const resp = new Response("edited");
                  resp.headers.set("x-edited", "yes");
                  return resp;
                }
                if (path === "/used") {
                  const resp = new Response("once");
                  await resp.text();
                  return resp;
                }
                if (path === "/clone") {
                  // Copies of the incoming request keep its URL.
                  const copy = new Request(request, { method: "POST", body: "x" });
                  return new Response(`${request.clone().url} ${copy.url} ${copy.method}`);
                }
                return new Response("?", { status: 404 });
              },
            };
            "#,
        )],
        &["static.js"],
    );
    let c = client();
    let get = |path: &str| c.get(dev.url(path)).send();
    let resp = get("/text").await.expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/plain;charset=UTF-8");
    assert_eq!(resp.text().await.expect("text"), "plain");
    let resp = get("/empty").await.expect("request");
    assert_eq!(resp.headers()["content-length"], "0");
    assert_eq!(resp.text().await.expect("text"), "");
    let resp = get("/json").await.expect("request");
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(resp.text().await.expect("text"), r#"{"a":1}"#);
    let resp = get("/bytes").await.expect("request");
    assert!(resp.headers().get("content-type").is_none());
    assert_eq!(resp.text().await.expect("text"), "hi");
    let resp = get("/html").await.expect("request");
    assert_eq!(resp.headers()["content-type"], "text/html; charset=utf-8");
    assert_eq!(resp.text().await.expect("text"), "<p>");
    // Headers changed after construction are sent, with the default type.
    let resp = get("/edited").await.expect("request");
    assert_eq!(resp.headers()["x-edited"], "yes");
    assert_eq!(resp.headers()["content-type"], "text/plain;charset=UTF-8");
    assert_eq!(resp.text().await.expect("text"), "edited");
    // A body the handler already read cannot be sent.
    let resp = get("/used").await.expect("request");
    assert_eq!(resp.status(), 500);
    assert_eq!(get("/text").await.expect("request").status(), 200);
    let url = dev.url("/clone");
    let text = get("/clone")
        .await
        .expect("request")
        .text()
        .await
        .expect("text");
    assert_eq!(text, format!("{url} {url} POST"));
}

#[tokio::test]
async fn webcrypto_work_off_the_isolate_is_bounded() {
    let dev = Dev::start(
        &[(
            "kdf.js",
            r#"
            const enc = new TextEncoder();
            const hex = (b) => [...new Uint8Array(b)].map((x) => x.toString(16).padStart(2, "0")).join("");
            const failure = (p) => p.then(() => "resolved", (e) => e.name);
            export default {
              async fetch() {
                const subtle = crypto.subtle;
                const key = await subtle.importKey("raw", enc.encode("pw"), "PBKDF2", false,
                  ["deriveBits", "deriveKey"]);
                const pbkdf2 = (iterations) => ({ name: "PBKDF2", hash: "SHA-256", salt: enc.encode("salt"), iterations });
                const out = {};
                out.one = hex(await subtle.deriveBits(pbkdf2(1), key, 256));
                out.thousand = hex(await subtle.deriveBits(pbkdf2(1000), key, 256));
                out.tooManyIterations = await failure(subtle.deriveBits(pbkdf2(100001), key, 256));
                out.tooManyBits = await failure(subtle.deriveBits(pbkdf2(1), key, 8192));
                out.tooLongKey = await failure(subtle.deriveKey(pbkdf2(1), key,
                  { name: "HMAC", hash: "SHA-256", length: 1000000 }, false, ["sign"]));
                out.bigRsa = await failure(subtle.generateKey(
                  { name: "RSASSA-PKCS1-v1_5", modulusLength: 8192, publicExponent: new Uint8Array([1, 0, 1]),
                    hash: "SHA-256" }, false, ["sign"]));
                // Getters that answer the check one way and the operation
                // another: the operation must see what was checked.
                let reads = 0;
                const shifty = pbkdf2(0);
                Object.defineProperty(shifty, "iterations", { get: () => (reads++ === 0 ? 1 : 2e9) });
                out.shifty = hex(await subtle.deriveBits(shifty, key, 256));
                let names = 0;
                const disguised = pbkdf2(2e9);
                disguised.name = { toString: () => (names++ === 0 ? "HKDF" : "PBKDF2") };
                out.disguised = await failure(subtle.deriveBits(disguised, key, 256));
                // Sizes the host would wrap around (it converts with ToUint32).
                out.wrappedModulus = await failure(subtle.generateKey(
                  { name: "RSASSA-PKCS1-v1_5", modulusLength: 8192 - 2 ** 32,
                    publicExponent: new Uint8Array([1, 0, 1]), hash: "SHA-256" }, false, ["sign"]));
                out.negativeLength = await failure(subtle.deriveKey(pbkdf2(1), key,
                  { name: "HMAC", hash: "SHA-256", length: -8 }, false, ["sign"]));
                out.hugeHmacKey = await failure(subtle.generateKey(
                  { name: "HMAC", hash: "SHA-256", length: 2 ** 31 }, false, ["sign"]));
                out.nullLength = await failure(subtle.deriveKey(pbkdf2(1), key,
                  { name: "HMAC", hash: "SHA-256", length: null }, false, ["sign"]));
                const argon = await subtle.importKey("raw", enc.encode("pw"), "Argon2id", false, ["deriveBits"]);
                out.argonMemory = await failure(subtle.deriveBits(
                  { name: "Argon2id", memory: 10_000_000, passes: 1, parallelism: 1, nonce: enc.encode("saltsalt") },
                  argon, 256));
                // Accessors reached through the prototype chain: a planted
                // "__proto__" member, or one on Object.prototype.
                const hung = (p) => Promise.race([failure(p), new Promise((r) => setTimeout(() => r("hung"), 5000))]);
                let protoReads = 0;
                const evil = { get iterations() { return protoReads++ < 3 ? 1 : 2e9; }, set iterations(_) {} };
                const planted = pbkdf2(undefined);
                delete planted.iterations;
                Object.defineProperty(planted, "__proto__", { value: evil, enumerable: true, writable: true, configurable: true });
                out.plantedProto = await hung(subtle.deriveBits(planted, key, 256));
                let globalReads = 0;
                Object.defineProperty(Object.prototype, "iterations", {
                  get() { return globalReads++ < 1 ? 1 : 2e9; }, set(_) {}, configurable: true });
                const inherited = pbkdf2(undefined);
                delete inherited.iterations;
                try {
                  const bits = await Promise.race([subtle.deriveBits(inherited, key, 256),
                    new Promise((r) => setTimeout(() => r(null), 5000))]);
                  out.inheritedAccessor = bits === null ? "hung" : hex(bits);
                } finally {
                  delete Object.prototype.iterations;
                }
                out.hugeXof = await failure(subtle.digest({ name: "cSHAKE256", outputLength: 2 ** 32 - 8 }, enc.encode("x")));
                // A private RSA key over the limit, as DER: only its structure
                // is checked on import, so the integers can be dummies.
                const der = (tag, bytes) => [tag, ...(bytes.length < 128 ? [bytes.length]
                  : bytes.length < 256 ? [0x81, bytes.length] : [0x82, bytes.length >> 8, bytes.length & 255]), ...bytes];
                const int = (bytes) => der(0x02, bytes);
                const seq = (...items) => der(0x30, items.flat());
                const one = int([1]);
                const rsaKey = seq(int([0]), int([0, ...new Array(526).fill(0xff)]), int([1, 0, 1]), one, one, one, one, one, one);
                const rsaOid = der(0x06, [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01]);
                const pkcs8 = new Uint8Array(seq(int([0]), seq(rsaOid, [0x05, 0x00]), der(0x04, rsaKey)));
                out.bigImportedRsa = await failure(subtle.importKey("pkcs8", pkcs8,
                  { name: "RSASSA-PKCS1-v1_5", hash: "SHA-256" }, false, ["sign"]));
                // Two operations at a time: a quick digest queued behind two
                // slow derivations finishes after one of them.
                const order = [];
                const slow = (tag) => subtle.deriveBits(pbkdf2(100000), key, 256).then(() => order.push(tag));
                await Promise.all([slow("pbkdf2"), slow("pbkdf2"),
                  subtle.digest("SHA-256", enc.encode("x")).then(() => order.push("digest"))]);
                out.order = order;
                // More operations than may run at once all finish, in order.
                const digests = await Promise.all(
                  Array.from({ length: 8 }, (_, i) => subtle.digest("SHA-256", enc.encode(String(i)))));
                out.digests = digests.map((d) => hex(d).slice(0, 8));
                return Response.json(out);
              },
            };
            "#,
        )],
        &["kdf.js"],
    );
    let text = get_text(&client(), &dev.url("/"), None).await;
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}\n{}", dev.log()));
    // RFC 6070-style vectors for PBKDF2-HMAC-SHA256, password "pw", salt "salt",
    // computed here with the sha2 crate's HMAC building blocks.
    assert_eq!(v["one"], pbkdf2_sha256_hex(b"pw", b"salt", 1));
    assert_eq!(v["thousand"], pbkdf2_sha256_hex(b"pw", b"salt", 1000));
    assert_eq!(v["tooManyIterations"], "NotSupportedError");
    assert_eq!(v["tooManyBits"], "NotSupportedError");
    assert_eq!(v["tooLongKey"], "NotSupportedError");
    assert_eq!(v["bigRsa"], "NotSupportedError");
    assert_eq!(
        v["shifty"], v["one"],
        "the checked value must be the one used"
    );
    assert_ne!(v["disguised"], "resolved", "{v}");
    assert_eq!(v["wrappedModulus"], "NotSupportedError");
    assert_eq!(v["negativeLength"], "NotSupportedError");
    assert_eq!(v["hugeHmacKey"], "NotSupportedError");
    assert_eq!(v["nullLength"], "resolved", "null means the default length");
    assert_eq!(v["argonMemory"], "NotSupportedError");
    assert_eq!(v["hugeXof"], "NotSupportedError");
    assert_eq!(v["bigImportedRsa"], "NotSupportedError");
    assert!(
        v["plantedProto"] != "resolved" && v["plantedProto"] != "hung",
        "{v}"
    );
    assert_eq!(v["inheritedAccessor"], v["one"], "{v}");
    // The digest alone takes microseconds: it can only come after a
    // derivation if it waited for that derivation's turn.
    assert_eq!(
        v["order"][0], "pbkdf2",
        "the digest must wait for a turn: {v}"
    );
    assert_eq!(v["order"].as_array().map(Vec::len), Some(3), "{v}");
    use sha2::Digest;
    let expected: Vec<String> = (0..8)
        .map(|i| hex::encode(&sha2::Sha256::digest(i.to_string().as_bytes())[..4]))
        .collect();
    assert_eq!(v["digests"], serde_json::json!(expected));
}

/// PBKDF2-HMAC-SHA256 with one 32-byte block, written out from RFC 8018.
fn pbkdf2_sha256_hex(password: &[u8], salt: &[u8], iterations: u32) -> String {
    use sha2::Digest;
    fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
        let mut k = [0u8; 64];
        if key.len() > 64 {
            k[..32].copy_from_slice(&sha2::Sha256::digest(key));
        } else {
            k[..key.len()].copy_from_slice(key);
        }
        let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
        let inner = sha2::Sha256::new()
            .chain_update(pad(0x36))
            .chain_update(msg)
            .finalize();
        sha2::Sha256::new()
            .chain_update(pad(0x5c))
            .chain_update(inner)
            .finalize()
            .into()
    }
    let mut u = hmac(password, &[salt, &1u32.to_be_bytes()].concat());
    let mut t = u;
    for _ in 1..iterations {
        u = hmac(password, &u);
        for (a, b) in t.iter_mut().zip(u) {
            *a ^= b;
        }
    }
    hex::encode(t)
}

/// Past its first thousand requests an isolate switches its hot ops to
/// V8's fast calls (see `bindFastCalls` in bootstrap.js): every kind of
/// answer those ops give must come out the same on either side of it.
#[tokio::test]
async fn answers_stay_the_same_once_a_busy_isolate_uses_fast_calls() {
    let dev = Dev::start(
        &[(
            "worker.js",
            r#"
            export default {
              async fetch(request) {
                const { pathname } = new URL(request.url);
                if (pathname === "/typed") return new Response("plain");
                if (pathname === "/json") return Response.json({ n: 1 });
                if (pathname === "/headers") {
                  return new Response("with headers", {
                    status: 203,
                    headers: { "content-type": "text/x-custom", "x-one": "1" },
                  });
                }
                return new Response(`echo ${await request.text()}`);
              },
            };
            "#,
        )],
        &["worker.js"],
    );
    let c = client();
    for i in 0..1500 {
        let (path, expect_status, expect_body, expect_type) = match i % 4 {
            0 => (
                "/typed",
                200,
                "plain".to_string(),
                "text/plain;charset=UTF-8",
            ),
            1 => ("/json", 200, r#"{"n":1}"#.to_string(), "application/json"),
            2 => ("/headers", 203, "with headers".to_string(), "text/x-custom"),
            _ => (
                "/echo",
                200,
                format!("echo {i}"),
                "text/plain;charset=UTF-8",
            ),
        };
        let resp = if path == "/echo" {
            c.post(dev.url(path)).body(i.to_string()).send().await
        } else {
            c.get(dev.url(path)).send().await
        }
        .expect("request");
        assert_eq!(resp.status(), expect_status, "request {i} to {path}");
        assert_eq!(resp.headers()["content-type"], expect_type, "request {i}");
        if path == "/headers" {
            assert_eq!(resp.headers()["x-one"], "1", "request {i}");
        }
        assert_eq!(resp.text().await.expect("body"), expect_body, "request {i}");
    }
}

#[tokio::test]
async fn a_request_body_read_whole_or_as_a_stream_is_used_up_either_way() {
    let dev = Dev::start(
        &[(
            "body.js",
            r#"
            export default {
              async fetch(request) {
                const path = new URL(request.url).pathname;
                const out = { usedBefore: request.bodyUsed };
                if (path === "/whole") {
                  out.text = await request.text();
                } else if (path === "/json") {
                  out.json = await request.json();
                } else if (path === "/bytes") {
                  out.bytes = (await request.arrayBuffer()).byteLength;
                } else if (path === "/stream") {
                  const reader = request.body.getReader();
                  let n = 0;
                  for (;;) {
                    const { value, done } = await reader.read();
                    if (done) break;
                    n += value.byteLength;
                  }
                  out.streamed = n;
                } else if (path === "/clone") {
                  const copy = request.clone();
                  out.both = [await copy.text(), await request.text()];
                } else if (path === "/bad-json") {
                  try { await request.json(); } catch (e) { out.error = e.name; }
                }
                out.usedAfter = request.bodyUsed;
                out.locked = request.body.locked;
                try {
                  await request.text();
                  out.again = "read again";
                } catch (e) {
                  out.again = e.name;
                }
                return Response.json(out);
              },
            };
            "#,
        )],
        &["body.js"],
    );
    let c = client();
    let post = |path: &'static str, body: &'static str| {
        let req = c.post(dev.url(path)).body(body);
        async move {
            let resp = req.send().await.expect("request");
            assert_eq!(resp.status(), 200, "{path}");
            resp.json::<serde_json::Value>().await.expect("json")
        }
    };
    let used = serde_json::json!({ "usedBefore": false, "usedAfter": true, "locked": true, "again": "TypeError" });
    let with = |extra: serde_json::Value| {
        let mut v = used.clone();
        v.as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        v
    };
    assert_eq!(
        post("/whole", "hello body").await,
        with(serde_json::json!({ "text": "hello body" }))
    );
    assert_eq!(
        post("/json", r#"{"a":[1,2]}"#).await,
        with(serde_json::json!({ "json": { "a": [1, 2] } }))
    );
    assert_eq!(
        post("/bytes", "12345").await,
        with(serde_json::json!({ "bytes": 5 }))
    );
    assert_eq!(
        post("/stream", "streamed!").await,
        with(serde_json::json!({ "streamed": 9 }))
    );
    assert_eq!(
        post("/clone", "twice").await,
        with(serde_json::json!({ "both": ["twice", "twice"] }))
    );
    assert_eq!(
        post("/bad-json", "{nope").await,
        with(serde_json::json!({ "error": "SyntaxError" }))
    );
}

#[tokio::test]
async fn request_headers_keep_their_values_bytes_and_repeats() {
    let dev = Dev::start(
        &[(
            "headers.js",
            r#"
            export default {
              fetch(request) {
                const h = request.headers;
                return Response.json({
                  agent: h.get("User-Agent"),
                  accept: h.get("accept"),
                  host: h.get("host") === new URL(request.url).host,
                  multi: h.get("x-multi"),
                  missing: h.get("x-missing"),
                  has: h.has("X-Multi"),
                  bytes: [...(h.get("x-bytes") ?? "")].map((c) => c.charCodeAt(0)),
                  names: [...h.keys()].filter((k) => k.startsWith("x-")),
                  copied: new Request("http://other.example/", request).headers.get("x-multi"),
                });
              },
            };
            "#,
        )],
        &["headers.js"],
    );
    let v: serde_json::Value = client()
        .get(dev.url("/"))
        .header("user-agent", "atoll-test")
        .header("accept", "text/x-test")
        .header("x-multi", "a")
        .header("x-multi", "b")
        .header(
            "x-bytes",
            reqwest::header::HeaderValue::from_bytes(b"c\xc3\xa9").expect("value"),
        )
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(
        v,
        serde_json::json!({
            "agent": "atoll-test",
            "accept": "text/x-test",
            "host": true,
            "multi": "a, b",
            "missing": null,
            "has": true,
            // One character per byte, as Workers and Deno give them.
            "bytes": [99, 195, 169],
            "names": ["x-bytes", "x-multi"],
            "copied": "a, b",
        })
    );
}
