// Conversations, kept in this browser only (localStorage).

import type { ChainReport } from "./verify";

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  cost?: number;
  balance?: number;
}

export interface Message {
  role: "user" | "assistant";
  content: string;
  usage?: Usage;
  report?: ChainReport;
  error?: string;
  stopped?: boolean;
}

export interface Conversation {
  id: string;
  title: string;
  messages: Message[];
  updated: number;
}

const STORAGE = "teeshard.conversations";

export function loadConversations(): Conversation[] {
  try {
    const parsed: unknown = JSON.parse(localStorage.getItem(STORAGE) ?? "[]");
    return Array.isArray(parsed) ? (parsed as Conversation[]) : [];
  } catch {
    return [];
  }
}

export function saveConversations(conversations: Conversation[]): void {
  localStorage.setItem(STORAGE, JSON.stringify(conversations));
}

export function newConversation(): Conversation {
  const id = Array.from(crypto.getRandomValues(new Uint8Array(8)), (b) =>
    b.toString(16).padStart(2, "0"),
  ).join("");
  return { id, title: "New conversation", messages: [], updated: Date.now() };
}
