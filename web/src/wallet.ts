// The user's wallet through EIP-1193 (window.ethereum): the entry node prepares
// each contract call (to, data, value); the wallet signs and sends it.

import { postJson } from "./api";

interface Eip1193 {
  request(args: { method: string; params?: unknown[] }): Promise<unknown>;
}

declare global {
  interface Window {
    ethereum?: Eip1193;
  }
}

export function hasWallet(): boolean {
  return typeof window.ethereum?.request === "function";
}

function provider(): Eip1193 {
  if (!window.ethereum) throw new Error("no wallet: install one that provides window.ethereum");
  return window.ethereum;
}

export async function connectWallet(): Promise<string> {
  const accounts = (await provider().request({ method: "eth_requestAccounts" })) as string[];
  if (!accounts?.length) throw new Error("the wallet shared no account");
  return accounts[0];
}

export interface WalletTx {
  to: string;
  data: string;
  value: string;
}

/** Ask the entry node for the call, have the wallet send it, wait until it is mined. */
export async function sendLedgerTx(from: string, request: Record<string, unknown>): Promise<string> {
  const tx = await postJson<WalletTx>("/v1/console/wallet/tx", request);
  const hash = (await provider().request({
    method: "eth_sendTransaction",
    params: [{ from, to: tx.to, data: tx.data, value: tx.value }],
  })) as string;
  for (let attempt = 0; attempt < 120; attempt++) {
    const receipt = (await provider().request({
      method: "eth_getTransactionReceipt",
      params: [hash],
    })) as { status?: string } | null;
    if (receipt) {
      if (receipt.status !== "0x1") throw new Error(`transaction ${hash} reverted`);
      return hash;
    }
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
  throw new Error(`transaction ${hash} was not mined in time`);
}
