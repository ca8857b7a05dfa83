// Drives exai's Streamable HTTP door with the official TypeScript SDK
// (@modelcontextprotocol/sdk, StreamableHTTPClientTransport), for tests/client/test_ts_sdk_http.py.
//
//   node ts_sdk_client.mjs <path of node_modules/@modelcontextprotocol/sdk> <url> <phase>
//
// phase "calls": list tools, call version, chat (with progress), a two-step thinkdeep; then end
// the session (DELETE). phase "cancel": start a slow chat and abort it once the test says the
// upstream has the request (a line on stdin). phase "terminate": the same slow chat, and the
// session ended (transport.terminateSession(): DELETE) while it runs; the call's outcome (its
// own timeout, 30 s, says it never settled). One JSON document is printed per step.
import { pathToFileURL } from "node:url";
import { createInterface } from "node:readline";

const [sdkRoot, url, phase] = process.argv.slice(2);
const load = (rel) => import(pathToFileURL(`${sdkRoot}/dist/esm/${rel}`).href);
const { Client } = await load("client/index.js");
const { StreamableHTTPClientTransport } = await load("client/streamableHttp.js");
const { CallToolResultSchema } = await load("types.js");

const out = (step, data) => process.stdout.write(JSON.stringify({ step, ...data }) + "\n");
const text = (r) => (r.content || []).map((c) => c.text || "").join("");

const transport = new StreamableHTTPClientTransport(new URL(url));
const client = new Client({ name: "exai-ts-test", version: "1.0.0" });
await client.connect(transport);
out("connected", { sessionId: transport.sessionId, version: transport.protocolVersion ?? null });

if (phase === "calls") {
  const tools = await client.listTools();
  out("tools", { names: tools.tools.map((t) => t.name) });
  const version = await client.callTool({ name: "version", arguments: {} });
  out("version", { isError: version.isError, text: text(version) });
  const progress = [];
  const chat = await client.callTool(
    { name: "chat", arguments: { prompt: "hello from typescript", model: "mock-fast" } },
    CallToolResultSchema,
    { onprogress: (p) => progress.push(p) },
  );
  out("chat", { isError: chat.isError, text: text(chat), progress });
  const step1 = await client.callTool({
    name: "thinkdeep",
    arguments: {
      step: "is the door stateless?", step_number: 1, total_steps: 2,
      next_step_required: true, findings: "the 2026 era needs no session", model: "mock-fast",
    },
  });
  out("step1", { isError: step1.isError, structured: step1.structuredContent });
  const step2 = await client.callTool({
    name: "thinkdeep",
    arguments: {
      step: "conclude", step_number: 2, total_steps: 2, next_step_required: false,
      findings: "a signed session id serves the initialize era", model: "mock-fast",
      continuation_id: step1.structuredContent.continuation_id,
    },
  });
  out("step2", { isError: step2.isError, text: text(step2).slice(0, 200) });
  const badArgs = await client.callTool({ name: "chat", arguments: { prompt: 42 } });
  out("bad_args", { isError: badArgs.isError, text: text(badArgs) });
  await transport.terminateSession();
  out("terminated", {});
} else if (phase === "cancel") {
  const controller = new AbortController();
  const call = client
    .callTool({ name: "chat", arguments: { prompt: "never mind", model: "mock-fast" } }, CallToolResultSchema, {
      signal: controller.signal,
      timeout: 120000,
    })
    .then((r) => ({ outcome: "answered", text: text(r) }))
    .catch((e) => ({ outcome: "aborted", error: String(e && e.message) }));
  out("started", {});
  const lines = createInterface({ input: process.stdin });
  for await (const _ of lines) break; // the test: "the upstream has the request"
  lines.close();
  process.stdin.destroy(); // (an open stdin would keep node running after the last step)
  controller.abort("the user changed their mind");
  out("cancel", await call);
  const after = await client.callTool({ name: "version", arguments: {} });
  out("after", { isError: after.isError });
} else if (phase === "terminate") {
  const call = client
    .callTool({ name: "chat", arguments: { prompt: "never mind", model: "mock-fast" } }, CallToolResultSchema, {
      timeout: 30000,
    })
    .then((r) => ({ outcome: "answered", text: text(r) }))
    .catch((e) => ({ outcome: "rejected", code: e && e.code, error: String(e && e.message) }));
  out("started", {});
  const lines = createInterface({ input: process.stdin });
  for await (const _ of lines) break; // the test: "the upstream has the request"
  lines.close();
  process.stdin.destroy();
  await transport.terminateSession();
  out("terminated", { sessionId: transport.sessionId ?? null });
  out("call", await call);
}
await client.close();
out("closed", {});
