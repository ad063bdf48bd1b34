// The smallest useful handler: greets, echoes the path and shows `env`.
interface Env {
  GREETING?: string;
}

export default {
  fetch(request: Request, env: Env): Response {
    const url = new URL(request.url);
    const greeting = env.GREETING ?? "Hello";
    console.log(`serving ${url.pathname}`);
    return new Response(`${greeting} from Atoll! You asked for ${url.pathname}\n`, {
      headers: { "content-type": "text/plain; charset=utf-8" },
    });
  },
};
