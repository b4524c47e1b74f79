// A typed fetch wrapper with timeouts, retries for idempotent requests,
// and errors that carry the response body.

export class HttpError extends Error {
  constructor(
    public readonly status: number,
    public readonly url: string,
    public readonly body: unknown,
  ) {
    super(`HTTP ${status} for ${url}`);
    this.name = "HttpError";
  }
}

export interface RequestOptions {
  method?: "GET" | "POST" | "PUT" | "PATCH" | "DELETE";
  query?: Record<string, string | number | boolean | undefined>;
  body?: unknown;
  headers?: Record<string, string>;
  timeoutMs?: number;
  retries?: number;
  signal?: AbortSignal;
}

const IDEMPOTENT = new Set(["GET", "PUT", "DELETE"]);
const RETRYABLE = new Set([408, 429, 500, 502, 503, 504]);

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

function buildUrl(base: string, path: string, query?: RequestOptions["query"]): string {
  const url = new URL(path.replace(/^\//, ""), base.endsWith("/") ? base : base + "/");
  for (const [key, value] of Object.entries(query ?? {})) {
    if (value !== undefined) url.searchParams.set(key, String(value));
  }
  return url.toString();
}

async function readBody(response: Response): Promise<unknown> {
  const type = response.headers.get("content-type") ?? "";
  if (response.status === 204) return undefined;
  return type.includes("application/json") ? response.json() : response.text();
}

export class ApiClient {
  constructor(
    private readonly baseUrl: string,
    private readonly defaultHeaders: Record<string, string> = {},
  ) {}

  async request<T>(path: string, options: RequestOptions = {}): Promise<T> {
    const method = options.method ?? "GET";
    const retries = options.retries ?? (IDEMPOTENT.has(method) ? 2 : 0);
    const url = buildUrl(this.baseUrl, path, options.query);
    let attempt = 0;

    for (;;) {
      const controller = new AbortController();
      const timer = setTimeout(() => controller.abort(), options.timeoutMs ?? 10_000);
      const onAbort = () => controller.abort();
      options.signal?.addEventListener("abort", onAbort, { once: true });
      try {
        const response = await fetch(url, {
          method,
          headers: {
            Accept: "application/json",
            ...(options.body !== undefined ? { "Content-Type": "application/json" } : {}),
            ...this.defaultHeaders,
            ...options.headers,
          },
          body: options.body !== undefined ? JSON.stringify(options.body) : undefined,
          signal: controller.signal,
        });
        const body = await readBody(response);
        if (response.ok) return body as T;
        if (attempt < retries && RETRYABLE.has(response.status)) {
          attempt++;
          const retryAfter = Number(response.headers.get("retry-after"));
          await sleep(Number.isFinite(retryAfter) && retryAfter > 0 ? retryAfter * 1000 : 250 * 2 ** attempt);
          continue;
        }
        throw new HttpError(response.status, url, body);
      } catch (err) {
        if (err instanceof HttpError || options.signal?.aborted || attempt >= retries) throw err;
        attempt++;
        await sleep(250 * 2 ** attempt);
      } finally {
        clearTimeout(timer);
        options.signal?.removeEventListener("abort", onAbort);
      }
    }
  }

  get<T>(path: string, query?: RequestOptions["query"]) {
    return this.request<T>(path, { query });
  }

  post<T>(path: string, body: unknown) {
    return this.request<T>(path, { method: "POST", body });
  }
}

// ---- usage

interface Repo {
  id: number;
  full_name: string;
  stargazers_count: number;
  archived: boolean;
}

export async function topRepos(client: ApiClient, org: string, limit = 5): Promise<string[]> {
  const repos = await client.get<Repo[]>(`/orgs/${encodeURIComponent(org)}/repos`, { per_page: 100 });
  return repos
    .filter((r) => !r.archived)
    .sort((a, b) => b.stargazers_count - a.stargazers_count)
    .slice(0, limit)
    .map((r) => `${r.full_name} (${r.stargazers_count}★)`);
}

export function debounce<A extends unknown[]>(fn: (...args: A) => void, waitMs: number) {
  let timer: ReturnType<typeof setTimeout> | undefined;
  return (...args: A) => {
    if (timer !== undefined) clearTimeout(timer);
    timer = setTimeout(() => {
      timer = undefined;
      fn(...args);
    }, waitMs);
  };
}
