// Reads {model, batch, length, ids, k} as JSON on stdin; prints the top-k item indices per row as JSON.
const ort = require("onnxruntime-node");

async function main() {
  const chunks = [];
  for await (const c of process.stdin) chunks.push(c);
  const req = JSON.parse(Buffer.concat(chunks).toString("utf8"));
  const session = await ort.InferenceSession.create(req.model, { executionProviders: ["cpu"] });
  const input = new ort.Tensor("int32", Int32Array.from(req.ids), [req.batch, req.length]);
  const out = await session.run({ item_ids: input });
  const scores = out.scores;
  const width = scores.dims[1];
  const top = [];
  for (let r = 0; r < req.batch; r++) {
    const row = Array.from(scores.data.subarray(r * width, (r + 1) * width));
    const order = row.map((s, i) => [s, i]).sort((a, b) => b[0] - a[0] || a[1] - b[1]).slice(0, req.k);
    top.push(order.map((p) => p[1]));
  }
  process.stdout.write(JSON.stringify({ top, inputs: session.inputNames, outputs: session.outputNames }));
}

main().catch((e) => { console.error(e); process.exit(1); });
