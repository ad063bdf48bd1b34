// Stand-in for Deno's `ext:deno_net/02_tls.js`, which deno_fetch loads for
// `Deno.createHttpClient`. Atoll handlers have no `Deno` namespace and no
// custom TLS clients, so the one export refuses.

(function () {
const { primordials } = __bootstrap;
const { TypeError } = primordials;

function loadTlsKeyPair() {
  throw new TypeError("custom HTTP clients are not available to Atoll handlers");
}

return { loadTlsKeyPair };
})();
