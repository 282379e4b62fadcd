// The entry node's HTTP API as the console uses it. The API key lives in this
// browser's localStorage only and is sent as a bearer token to this origin.

const KEY_STORAGE = "teeshard.apiKey";

export function getApiKey(): string {
  return localStorage.getItem(KEY_STORAGE) ?? "";
}

export function setApiKey(key: string): void {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly code: string | null = null,
  ) {
    super(message);
  }
}

export function authHeaders(): Record<string, string> {
  const key = getApiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

export async function errorOf(response: Response): Promise<ApiError> {
  try {
    const body = (await response.json()) as { error?: { message?: string; code?: string } };
    return new ApiError(
      response.status,
      body.error?.message ?? `HTTP ${response.status}`,
      body.error?.code ?? null,
    );
  } catch {
    return new ApiError(response.status, `HTTP ${response.status}`);
  }
}

export async function getJson<T>(path: string, auth = false): Promise<T> {
  const response = await fetch(path, { headers: auth ? authHeaders() : {} });
  if (!response.ok) throw await errorOf(response);
  return (await response.json()) as T;
}

export async function postJson<T>(path: string, body: unknown, auth = false): Promise<T> {
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", ...(auth ? authHeaders() : {}) },
    body: JSON.stringify(body),
  });
  if (!response.ok) throw await errorOf(response);
  return (await response.json()) as T;
}

export interface Info {
  model: string;
  ledger: "none" | "sql" | "evm";
  free_for_operators: boolean;
  evm: { contract: string; chain_id: number; wei_per_token: number } | null;
}

export interface Account {
  account: string;
  available: number;
  reserved: number;
  earnings: number;
  operator: boolean;
  free_use: boolean;
}

export interface UsageRow {
  request_id: string;
  at: number;
  state: "reserved" | "settled" | "released";
  reserved: number;
  cost: number;
}

export interface PoolNode {
  node_id: string;
  operator: string;
  url: string;
  model: string;
  layers: string;
  admitted: boolean;
  served_tokens: number;
  served_total: number;
  pending_payout: number;
}

export interface Stage {
  stage: number;
  layers: string;
  model: string;
  provider: string;
  tee_type: string;
  insecure: boolean;
  manifest_hash: string;
  certificate_sha256: string;
  signed_at: number;
  verified: boolean;
  fresh: boolean;
  problem: string | null;
  tcb_status: string | null;
  measurements: Record<string, string>;
}

export interface Network {
  model: string;
  num_layers: number;
  entry: {
    status: string;
    layers: [number, number];
    sessions: { open: number; max_sessions: number; reserved_tokens: number };
  };
  next: { url: string; connected: boolean; in_flight: number } | null;
  stages: Stage[];
  covers_all_layers: boolean;
  models: { id: string }[];
  registered: PoolNode[];
}

/** `GET /v1/network`: the registry of a routed network (detail for the admin or loopback). */
export interface NetworkNodeState {
  url: string;
  layers: string;
  attestation: "unknown" | "verified" | "failed";
  healthy: boolean;
  problem: string | null;
  banned_for_s: number;
  ban_reason: string | null;
  sessions: number; // this entry's sessions on it
  load: { step_ms: number | null; sessions: number; in_flight: number } | null;
  usable: boolean;
}

export interface Registry {
  routing: "static" | "registry";
  detail: boolean;
  num_layers?: number;
  ranges?: (string | { layers: string; usable_nodes: number })[];
  nodes?: NetworkNodeState[];
  routes?: string[][];
  counters?: { failovers: number; retries: number; bans: Record<string, number> };
}

export interface Found {
  url: string;
  node_id: string;
  provider: string;
  insecure: boolean;
  model: string;
  layers: string;
  manifest_hash: string;
  notes: string[];
  admitted?: boolean;
}

export function errorText(error: unknown): string {
  if (error instanceof ApiError) {
    if (error.status === 402) {
      return `${error.message}. Buy tokens on the Account page.`;
    }
    if (error.code === "missing_api_key" || error.code === "invalid_api_key") {
      return `${error.message}. Enter your API key on the Account page.`;
    }
    return error.message;
  }
  return error instanceof Error ? error.message : String(error);
}
