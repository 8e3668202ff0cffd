// The playground: one prompt sent twice through the public streaming API (the adapted request with
// `adaptation.progress`, and the base model), its progress events drawn as they arrive. No library, no
// network beyond this server.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const STAGES = ["queue", "merge", "select", "train", "load_adapter", "generate"];

function adaptation(mode, knobs) {
  const progress = { progress: true, method: knobs.method };
  const budget = knobs.gainBudget === "" ? {} : { gain_budget: Number(knobs.gainBudget) };
  switch (mode) {
    case "base": return { enabled: false };
    case "context": return { ...progress, context: "prepend", max_steps: 0 };
    case "merge": return { mode: "merge", progress: true };
    default: return { ...progress, ...budget, mode, max_steps: knobs.steps };
  }
}

// Yields each JSON payload of a server-sent event stream; an HTTP error becomes an Error with the API's words.
async function* events(response) {
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try { message = (await response.json()).error.message; } catch (_) { /* not OpenAI's JSON */ }
    throw new Error(message);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;  // SSE comments keep the connection alive
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const payload = JSON.parse(data);
        if (payload.error) throw new Error(payload.error.message);
        yield payload;
      }
    }
  }
}

async function stream(body, key, onChunk) {
  const headers = { "Content-Type": "application/json" };
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch("/v1/chat/completions", { method: "POST", headers, body: JSON.stringify(body) });
  for await (const chunk of events(response)) onChunk(chunk);
}

function chart(svg, values, label) {
  svg.replaceChildren();
  svg.dataset.points = String(values.length);
  if (!values.length) return;
  const [w, h, pad] = [320, 160, 24];
  const lo = Math.min(...values), hi = Math.max(...values);
  const x = (i) => pad + (values.length === 1 ? 0 : (i * (w - 2 * pad)) / (values.length - 1));
  const y = (v) => h - pad - (hi === lo ? 0.5 : (v - lo) / (hi - lo)) * (h - 2 * pad);
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("points", values.map((v, i) => `${x(i)},${y(v)}`).join(" "));
  svg.appendChild(line);
  values.forEach((v, i) => {
    const dot = document.createElementNS(SVG, "circle");
    dot.setAttribute("cx", x(i));
    dot.setAttribute("cy", y(v));
    dot.setAttribute("r", 3);
    const title = document.createElementNS(SVG, "title");
    title.textContent = `${label} ${i + 1}: ${v.toFixed(4)}`;
    dot.appendChild(title);
    svg.appendChild(dot);
  });
  for (const [text, vy] of [[hi.toFixed(3), pad - 6], [lo.toFixed(3), h - 6]]) {
    const t = document.createElementNS(SVG, "text");
    t.setAttribute("x", 2);
    t.setAttribute("y", vy);
    t.textContent = text;
    svg.appendChild(t);
  }
}

function documents(list, sigma2) {
  const ol = $("documents");
  ol.replaceChildren();
  list.forEach((doc, i) => {
    const li = document.createElement("li");
    const source = document.createElement("span");
    source.className = "source";
    source.textContent = doc.source;
    const sigma = document.createElement("span");
    sigma.className = "sigma";
    sigma.textContent = ` \u03c3\u00b2 ${sigma2[i + 1].toFixed(4)}`;
    const snippet = document.createElement("span");
    snippet.className = "snippet";
    snippet.textContent = doc.snippet || doc.id;
    li.append(source, sigma, snippet);
    ol.appendChild(li);
  });
}

function timings(report, seconds) {
  const body = $("timings").tBodies[0];
  body.replaceChildren();
  const rows = STAGES.map((stage) => [stage, report.timings[stage]]);
  rows.push(["end to end (this page)", seconds]);
  for (const [name, value] of rows) {
    const tr = body.insertRow();
    tr.insertCell().textContent = name;
    tr.insertCell().textContent = `${value.toFixed(2)} s`;
  }
  body.dataset.filled = "true";
}

function status(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

async function run(event) {
  event.preventDefault();
  const knobs = {
    prompt: $("prompt").value.trim(),
    mode: $("mode").value,
    steps: Number($("steps").value),
    method: $("method").value,
    gainBudget: $("gain_budget").value,
    maxTokens: Number($("max_tokens").value),
    key: $("api_key").value.trim(),
  };
  if (!knobs.prompt) return status("Write a prompt first.", true);
  for (const id of ["adapted", "base", "experts"]) $(id).textContent = "";
  $("documents").replaceChildren();
  chart($("sigma2"), [], "pick");
  chart($("loss"), [], "step");
  $("timings").tBodies[0].replaceChildren();
  delete $("timings").tBodies[0].dataset.filled;
  $("run").disabled = true;
  status("Selecting, training and answering\u2026");
  const started = performance.now();
  let model;
  try {
    const auth = knobs.key ? { Authorization: `Bearer ${knobs.key}` } : {};
    const models = await fetch("/v1/models", { headers: auth });
    if (!models.ok) throw new Error((await models.json()).error.message);
    model = (await models.json()).data[0].id;
  } catch (error) {
    $("run").disabled = false;
    return status(error.message, true);
  }
  const request = (options) => ({
    model,
    messages: [{ role: "user", content: knobs.prompt }],
    max_tokens: knobs.maxTokens,
    temperature: 0,
    stream: true,
    adaptation: options,
  });
  const losses = [];
  const adapted = stream(request(adaptation(knobs.mode, knobs)), knobs.key, (chunk) => {
    const report = chunk.adaptation;
    if (report && report.stage === "merged") {
      $("experts").textContent = `Merged ${report.experts.length} experts (rank ${report.rank}): ` +
        report.experts.map((e) => `#${e.expert} ${e.weight.toFixed(2)}`).join(", ");
    } else if (report && report.stage === "selected") {
      documents(report.documents, report.sigma2);
      chart($("sigma2"), report.sigma2.slice(1), "pick");
    } else if (report && report.stage === "training") {
      losses.push(report.loss);
      chart($("loss"), losses, "step");
    }
    for (const choice of chunk.choices || []) $("adapted").textContent += choice.delta.content || "";
    if (report && report.timings && chunk.choices.some((c) => c.finish_reason)) {
      timings(report, (performance.now() - started) / 1000);
    }
  });
  const base = knobs.mode === "base" ? Promise.resolve() : stream(request({ enabled: false }), knobs.key, (chunk) => {
    for (const choice of chunk.choices || []) $("base").textContent += choice.delta.content || "";
  });
  const outcomes = await Promise.allSettled([adapted, base]);
  $("run").disabled = false;
  const failed = outcomes.find((o) => o.status === "rejected");
  if (failed) return status(failed.reason.message, true);
  status(`Done in ${((performance.now() - started) / 1000).toFixed(1)} s.`);
}

$("ask").addEventListener("submit", run);
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("ask").requestSubmit();
});
