// Streams a response chunk by chunk: each line reaches the client as soon
// as it is produced. Try: curl -N http://127.0.0.1:8787/
export default {
  fetch(_request: Request): Response {
    const encoder = new TextEncoder();
    let n = 0;
    const body = new ReadableStream<Uint8Array>({
      async pull(controller) {
        if (n === 5) {
          controller.close();
          return;
        }
        await new Promise((r) => setTimeout(r, 200));
        controller.enqueue(encoder.encode(`tick ${++n}\n`));
      },
    });
    return new Response(body, { headers: { "content-type": "text/plain" } });
  },
} satisfies ExportedHandler;

interface ExportedHandler {
  fetch(request: Request): Response | Promise<Response>;
}
