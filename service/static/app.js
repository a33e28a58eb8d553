// The demo page: plain fetch calls to the API, no framework and no build step.
"use strict";

const KEY_STORAGE = "vae-api-key";
const $ = (id) => document.getElementById(id);

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

// A readable message from an error response: FastAPI sends {detail: string | [{loc, msg}]}.
async function errorMessage(response) {
  let detail = response.statusText;
  try {
    const body = await response.json();
    if (typeof body.detail === "string") {
      detail = body.detail;
    } else if (Array.isArray(body.detail)) {
      detail = body.detail.map((e) => `${(e.loc || []).slice(1).join(".")}: ${e.msg}`).join("; ");
    }
  } catch {
    // not JSON: keep the status text
  }
  const hint = response.status === 401 ? " Enter the server's API key above." : "";
  return `${response.status} ${detail}.${hint}`;
}

// fetch with the API key; resolves to the response, throws Error(message) on a non-2xx.
async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = apiKey();
  if (key) headers.set("X-API-Key", key);
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) throw new Error(await errorMessage(response));
  return response;
}

function setStatus(element, text, isError = false) {
  element.textContent = text;
  element.classList.toggle("error", isError);
  element.setAttribute("role", isError ? "alert" : "status");
}

const objectUrls = new Map();
// Point an <img> at a Blob, releasing the URL it showed before.
function showBlob(img, blob) {
  if (objectUrls.has(img)) URL.revokeObjectURL(objectUrls.get(img));
  const url = URL.createObjectURL(blob);
  objectUrls.set(img, url);
  img.src = url;
}

function pngDataUrl(base64) {
  return `data:image/png;base64,${base64}`;
}

async function loadModelInfo() {
  const info = $("model-info");
  try {
    const model = await (await api("/model")).json();
    const { channels, height, width } = model.image;
    info.textContent = `${model.name} ${model.version} · ${width}×${height}×${channels} · ` +
      `latent ${model.latent_dim} · ${model.likelihood}`;
    $("score-input-caption").textContent = `Input, as the model saw it (${width}×${height})`;
  } catch (error) {
    info.textContent = `Model info unavailable: ${error.message}`;
  }
}

// Score: /elbo for the numbers and the anomaly map, /reconstruct for the pictures (the input
// converted and resized as the model saw it, and its reconstruction), in parallel.
async function scoreFile(file) {
  const status = $("score-status");
  if (!file) return;
  setStatus(status, `Scoring ${file.name}…`);
  const form = () => {
    const data = new FormData();
    data.append("images", file, file.name);
    return data;
  };
  try {
    const [elbo, reconstruction] = await Promise.all([
      api("/elbo?map=png", { method: "POST", body: form() }).then((r) => r.json()),
      api("/reconstruct?inputs=true", { method: "POST", body: form() }).then((r) => r.json()),
    ]);
    const result = elbo.results[0];
    $("score-input").src = pngDataUrl(reconstruction.inputs[0]);
    $("score-reconstruction").src = pngDataUrl(reconstruction.images[0]);
    $("score-map").src = pngDataUrl(result.anomaly_map);
    $("score-elbo").textContent = result.elbo.toFixed(2);
    $("score-percentile").textContent =
      result.percentile === null ? "no calibration" : `${result.percentile.toFixed(1)}`;
    const verdict = $("score-verdict");
    verdict.classList.remove("normal", "anomaly");
    if (result.is_anomaly === null) {
      verdict.textContent = "No threshold";
    } else if (result.is_anomaly) {
      verdict.textContent = "Anomaly";
      verdict.classList.add("anomaly");
    } else {
      verdict.textContent = "Normal";
      verdict.classList.add("normal");
    }
    $("score-result").hidden = false;
    const threshold = elbo.threshold === null ? "" : `, threshold ${elbo.threshold.toPrecision(3)}`;
    setStatus(status, `${file.name}: anomaly score ${result.anomaly_score.toPrecision(3)} ` +
      `(${elbo.score}${threshold})`);
  } catch (error) {
    setStatus(status, error.message, true);
  }
}

async function sample(event) {
  event.preventDefault();
  const status = $("sample-status");
  const button = $("sample-button");
  const params = new URLSearchParams({
    n: $("sample-n").value,
    seed: $("sample-seed").value,
    temperature: $("sample-temperature").value,
  });
  button.disabled = true;
  setStatus(status, "Sampling…");
  try {
    const response = await api(`/sample?${params}`, { headers: { Accept: "image/png" } });
    const grid = $("sample-grid");
    showBlob(grid, await response.blob());
    grid.hidden = false;
    const seed = response.headers.get("X-Seed");
    setStatus(status, `seed ${seed}, temperature ${params.get("temperature")}`);
  } catch (error) {
    setStatus(status, error.message, true);
  } finally {
    button.disabled = false;
  }
}

async function interpolate(event) {
  event.preventDefault();
  const status = $("interp-status");
  const button = $("interp-button");
  const a = $("interp-a").files[0];
  const b = $("interp-b").files[0];
  const data = new FormData();
  data.append("a", a, a.name);
  data.append("b", b, b.name);
  const params = new URLSearchParams({
    steps: $("interp-steps").value,
    mode: $("interp-mode").value,
  });
  button.disabled = true;
  setStatus(status, "Interpolating…");
  try {
    const body = await (await api(`/interpolate?${params}`, { method: "POST", body: data })).json();
    const strip = $("interp-strip");
    strip.replaceChildren(...body.images.map((image, i) => {
      const item = document.createElement("li");
      const img = document.createElement("img");
      img.className = "pixel";
      img.src = pngDataUrl(image);
      img.width = 72;
      img.height = 72;
      img.alt = `step ${i + 1} of ${body.steps}`;
      item.append(img);
      return item;
    }));
    strip.hidden = false;
    setStatus(status, `${body.steps} steps, ${body.mode}, from ${a.name} to ${b.name}`);
  } catch (error) {
    setStatus(status, error.message, true);
  } finally {
    button.disabled = false;
  }
}

function setUpDropZone() {
  const zone = $("drop-zone");
  const input = $("score-file");
  input.addEventListener("change", () => scoreFile(input.files[0]));
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    zone.addEventListener(type, () => zone.classList.remove("over"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    const file = event.dataTransfer.files[0];
    if (file) scoreFile(file);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = apiKey();
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
    loadModelInfo();
  });
  setUpDropZone();
  $("sample-form").addEventListener("submit", sample);
  $("interp-form").addEventListener("submit", interpolate);
  loadModelInfo();
});
