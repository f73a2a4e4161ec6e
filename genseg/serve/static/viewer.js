// The genseg viewer: uploads one file to the server, keeps the returned probability maps and thresholds them
// here, so the threshold slider never asks the server again. Volumes arrive a page of slices at a time.
"use strict";

const OVERLAY_COLOR = [60, 220, 60]; // genseg.viz.PREDICTION_COLOR, as `genseg segment` draws its overlays
const OVERLAY_ALPHA = 0.3;

const $ = (id) => document.getElementById(id);
const config = { segment_route: "/viewer/segment", page_slices: 32, max_body_bytes: Infinity };
let current = null; // the file shown: {file, name, kind, total, shape, modelSize, affine, slices: Map}
let upload = null; // the AbortController of the upload in flight

function setState(state) { document.body.dataset.state = state; }

function showError(box, message) {
  box.textContent = message;
  box.hidden = false;
}

function clearError(box) {
  box.textContent = "";
  box.hidden = true;
}

class ServerError extends Error {}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return `${body.error.message} (HTTP ${response.status})`;
  } catch (ignored) { /* not JSON: fall through */ }
  return `the server answered HTTP ${response.status}`;
}

async function postJson(route, init) {
  let response;
  try {
    response = await fetch(route, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ServerError("the server could not be reached; is `genseg serve` still running?");
  }
  if (!response.ok) throw new ServerError(await errorMessage(response));
  return response.json();
}

async function pixelsOf(pngBase64) {
  const image = new Image();
  image.src = `data:image/png;base64,${pngBase64}`;
  await image.decode();
  const canvas = document.createElement("canvas");
  canvas.width = image.naturalWidth;
  canvas.height = image.naturalHeight;
  const context = canvas.getContext("2d");
  context.drawImage(image, 0, 0);
  return context.getImageData(0, 0, canvas.width, canvas.height);
}

async function fetchPage(file, start, signal) {
  const route = `${config.segment_route}?start=${start}&count=${config.page_slices}`;
  return postJson(route, { method: "POST", body: file, signal,
                           headers: { "Content-Type": "application/octet-stream" } });
}

async function storePage(target, page) {
  for (const slice of page.slices) {
    const image = await pixelsOf(slice.image);
    const probability = await pixelsOf(slice.probability);
    target.slices.set(slice.index, { image, probability });
  }
}

async function ensureSlice(index) {
  const shown = current;
  if (shown.slices.has(index)) return;
  const start = Math.floor(index / config.page_slices) * config.page_slices;
  $("notice").textContent = `loading slices ${start}–${Math.min(start + config.page_slices, shown.total) - 1}…`;
  const page = await fetchPage(shown.file, start, shown.signal);
  await storePage(shown, page);
  $("notice").textContent = "";
}

// The mask at the image's resolution: probabilities (8-bit, model resolution) >= threshold, enlarged nearest-exact
// like genseg.inference.files.resize_mask.
function maskOf(slice, threshold) {
  const [height, width] = current.shape;
  const size = slice.probability.width;
  const probability = slice.probability.data;
  const mask = new Uint8Array(width * height);
  for (let r = 0; r < height; r++) {
    const pr = Math.min(size - 1, Math.floor((r + 0.5) * size / height));
    for (let c = 0; c < width; c++) {
      const pc = Math.min(size - 1, Math.floor((c + 0.5) * size / width));
      mask[r * width + c] = probability[(pr * size + pc) * 4] / 255 >= threshold ? 1 : 0;
    }
  }
  return mask;
}

function measure(mask) {
  const [height, width] = current.shape;
  let area = 0, x0 = width, y0 = height, x1 = -1, y1 = -1;
  for (let r = 0; r < height; r++) {
    for (let c = 0; c < width; c++) {
      if (!mask[r * width + c]) continue;
      area++;
      x0 = Math.min(x0, c); x1 = Math.max(x1, c); y0 = Math.min(y0, r); y1 = Math.max(y1, r);
    }
  }
  return { area, bbox: area ? [x0, y0, x1, y1] : null };
}

function threshold() { return Number($("threshold").value); }

function sliceIndex() { return Number($("slice").value); }

function render() {
  const slice = current.slices.get(sliceIndex());
  if (!slice) return;
  const [height, width] = current.shape;
  const mask = maskOf(slice, threshold());
  const canvas = $("view");
  canvas.width = width;
  canvas.height = height;
  const out = new ImageData(new Uint8ClampedArray(slice.image.data), width, height);
  for (let i = 0; i < mask.length; i++) {
    if (!mask[i]) continue;
    for (let k = 0; k < 3; k++) {
      out.data[i * 4 + k] = out.data[i * 4 + k] * (1 - OVERLAY_ALPHA) + OVERLAY_COLOR[k] * OVERLAY_ALPHA;
    }
  }
  canvas.getContext("2d").putImageData(out, 0, 0);
  const { area, bbox } = measure(mask);
  $("area").textContent = String(area);
  $("share").textContent = (100 * area / mask.length).toFixed(2);
  $("bbox").textContent = bbox ? bbox.join(", ") : "none";
  $("threshold-value").textContent = threshold().toFixed(2);
  $("slice-value").textContent = `${sliceIndex()} / ${current.total - 1}`;
}

function stemOf(name) { return name.replace(/\.nii\.gz$/i, "").replace(/\.[^.]*$/, "") || "upload"; }

function save(blob, name) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

function downloadPng() {
  const [height, width] = current.shape;
  const mask = maskOf(current.slices.get(sliceIndex()), threshold());
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const pixels = new ImageData(width, height);
  for (let i = 0; i < mask.length; i++) {
    const v = mask[i] * 255;
    pixels.data.set([v, v, v, 255], i * 4);
  }
  canvas.getContext("2d").putImageData(pixels, 0, 0);
  const suffix = current.total > 1 ? `_z${String(sliceIndex()).padStart(3, "0")}` : "";
  canvas.toBlob((blob) => save(blob, `${stemOf(current.name)}${suffix}_mask.png`), "image/png");
}

// A NIfTI-1 uint8 mask on the upload's voxel grid (rows, columns, slices; affine in the sform), gzipped.
function niftiBytes(masks, affine) {
  const [height, width] = current.shape;
  const depth = masks.length;
  const buffer = new ArrayBuffer(352 + width * height * depth);
  const view = new DataView(buffer);
  view.setInt32(0, 348, true);
  [3, height, width, depth, 1, 1, 1, 1].forEach((d, i) => view.setInt16(40 + 2 * i, d, true));
  view.setInt16(70, 2, true); // DT_UINT8
  view.setInt16(72, 8, true);
  const spacing = [0, 1, 2].map((j) => Math.hypot(affine[0][j], affine[1][j], affine[2][j]));
  [1, ...spacing, 1, 1, 1, 1].forEach((d, i) => view.setFloat32(76 + 4 * i, d, true));
  view.setFloat32(108, 352, true);
  view.setFloat32(112, 1, true);
  view.setInt16(254, 1, true); // sform_code: scanner
  for (let row = 0; row < 3; row++) {
    for (let j = 0; j < 4; j++) view.setFloat32(280 + 16 * row + 4 * j, affine[row][j], true);
  }
  new Uint8Array(buffer, 344, 4).set([0x6e, 0x2b, 0x31, 0]); // "n+1\0"
  const voxels = new Uint8Array(buffer, 352);
  masks.forEach((mask, k) => {
    for (let r = 0; r < height; r++) {
      for (let c = 0; c < width; c++) voxels[r + c * height + k * height * width] = mask[r * width + c];
    }
  });
  return new Blob([buffer]).stream().pipeThrough(new CompressionStream("gzip"));
}

async function downloadNifti() {
  const shown = current;
  setState("busy");
  try {
    for (let k = 0; k < shown.total; k += config.page_slices) await ensureSlice(k);
    const masks = [];
    for (let k = 0; k < shown.total; k++) masks.push(maskOf(shown.slices.get(k), threshold()));
    const identity = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]];
    const blob = await new Response(niftiBytes(masks, shown.affine || identity)).blob();
    save(blob, `${stemOf(shown.name)}_mask.nii.gz`);
    setState("ready");
  } catch (err) {
    fail($("error"), err);
  }
}

function fail(box, err) {
  if (err.name === "AbortError") return; // a newer upload replaced this one
  showError(box, err instanceof ServerError ? err.message : `the page failed: ${err.message}`);
  setState("error");
}

async function segment(file) {
  if (upload) {
    upload.abort();
    $("notice").textContent = "the previous upload was cancelled: this file replaces it";
  }
  const controller = new AbortController();
  upload = controller;
  clearError($("error"));
  setState("busy");
  try {
    if (file.size > config.max_body_bytes) {
      throw new ServerError(`the file is larger than the server accepts (${file.size} bytes; at most ` +
                            `${config.max_body_bytes} bytes per upload)`);
    }
    const page = await fetchPage(file, 0, controller.signal);
    const loaded = { file, name: file.name, kind: page.kind, total: page.total, shape: page.shape,
                     affine: page.affine, signal: controller.signal, slices: new Map() };
    await storePage(loaded, page);
    if (upload !== controller) return;
    current = loaded;
    $("result-name").textContent = file.name;
    $("result-kind").textContent = `(${page.kind}, ${page.total} slice${page.total > 1 ? "s" : ""}, ` +
                                   `${page.shape[1]} × ${page.shape[0]} px)`;
    $("slice").max = String(page.total - 1);
    $("slice").value = "0";
    $("slice-control").hidden = page.total < 2;
    $("download-nifti").hidden = page.total < 2 && page.affine === null;
    $("result").hidden = false;
    if (!$("notice").textContent.startsWith("the previous")) $("notice").textContent = "";
    render();
    setState("ready");
  } catch (err) {
    if (upload === controller) fail($("error"), err);
  } finally {
    if (upload === controller) upload = null;
  }
}

async function moveSlice() {
  const shown = current;
  clearError($("error"));
  try {
    await ensureSlice(sliceIndex());
    if (shown === current) render();
  } catch (err) {
    fail($("error"), err);
  }
}

async function generate(event) {
  event.preventDefault();
  const box = $("generate-error");
  clearError(box);
  setState("busy");
  const parameters = { generate: 1, steps: Number($("gen-steps").value), seed: Number($("gen-seed").value) };
  if (config.classes > 0) parameters.class = Number($("gen-class").value);
  try {
    const body = await postJson(config.predict_route, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ instances: [{}], parameters }) });
    const prediction = body.predictions[0];
    $("gen-image").src = `data:image/png;base64,${prediction.image.data}`;
    $("gen-mask").src = prediction.generated_mask ? `data:image/png;base64,${prediction.generated_mask.data}` : "";
    $("gen-prediction").src = `data:image/png;base64,${prediction.mask.data}`;
    const dice = prediction.dice_generated_vs_predicted;
    $("gen-dice").textContent = dice === undefined ? "no generated mask (image-only model)" : dice.toFixed(3);
    $("generated").hidden = false;
    setState("ready");
  } catch (err) {
    fail(box, err);
  }
}

async function start() {
  try {
    Object.assign(config, await postJson("/viewer/config", {}));
  } catch (err) {
    $("server-status").textContent = err.message;
    setState("error");
    return;
  }
  $("server-status").textContent = config.ready ? "model ready" : "the model is still loading";
  $("threshold").value = String(config.threshold);
  $("generate-panel").hidden = !config.generate;
  $("class-control").hidden = !(config.classes > 0);
  if (config.classes > 0) $("gen-class").max = String(config.classes - 1);
  $("file-input").addEventListener("change", (event) => {
    if (event.target.files.length) segment(event.target.files[0]);
  });
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    if (event.dataTransfer.files.length) segment(event.dataTransfer.files[0]);
  });
  $("threshold").addEventListener("input", () => current && render());
  $("slice").addEventListener("input", () => current && moveSlice());
  $("download-png").addEventListener("click", downloadPng);
  $("download-nifti").addEventListener("click", downloadNifti);
  $("generate-form").addEventListener("submit", generate);
  setState("idle");
}

start();
