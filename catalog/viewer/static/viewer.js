// ctfactory viewer page: the case list with filters, and NiiVue showing one case with its label overlay.
// Served by catalog/viewer/server.py; talks only to that server (/api/..., /volumes/...).
// State for tests and measurements: <body data-state="loading|ready|error" data-case="<id>"
// data-case-state="loading|rendered|error">, and window.ctfactoryViewer.timings (milliseconds).
"use strict";

const FILTERS = ["cohort", "body_region", "qc", "pathology", "status"];
const VIEWS = {
  axial: (nv) => nv.sliceTypeAxial,
  coronal: (nv) => nv.sliceTypeCoronal,
  sagittal: (nv) => nv.sliceTypeSagittal,
  multiplanar: (nv) => nv.sliceTypeMultiplanar,
  render: (nv) => nv.sliceTypeRender,
};
const AUTO_WINDOW = "auto";
// NIfTI's intent code for label maps: NiiVue then colours each integer ID exactly (its atlas shader);
// with intent 0 it would interpolate the colour table and tint background voxels.
const NIFTI_INTENT_LABEL = 1002;
const DETAIL_SKIP = new Set(["image_sha256", "label_sha256"]);

const state = {
  nv: null,
  catalog: null,
  labels: null,
  labelNames: new Map(),
  windowKey: null,
  loadToken: 0,
  selected: null,
};
const timings = { pageReadyMs: null, caseRenderMs: null, caseFetchMs: null };
window.ctfactoryViewer = { timings, state };

const $ = (selector) => document.querySelector(selector);

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "style") Object.assign(node.style, value);
    else node[key] = value;
  }
  for (const child of children) node.append(child);
  return node;
}

async function getJSON(url) {
  const response = await fetch(url, { headers: { Accept: "application/json" } });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function showError(where, error) {
  where.textContent = String(error.message || error);
  where.classList.add("error");
}

// -- catalog and case list ---------------------------------------------------------------------------

function fillFacets(facets) {
  const form = $("#filters");
  for (const name of FILTERS) {
    const select = form.elements[name];
    const keep = select.value;
    select.replaceChildren(el("option", { value: "", textContent: "all" }));
    for (const value of facets[name] || []) {
      select.append(el("option", { value: String(value), textContent: String(value) }));
    }
    select.value = (facets[name] || []).map(String).includes(keep) ? keep : "";
  }
}

async function loadCatalog() {
  const catalog = await getJSON("/api/catalog");
  state.catalog = catalog;
  const pinned = catalog.pinned ? " (pinned)" : "";
  $("#catalog-info").textContent =
    `${catalog.root} | version ${catalog.version}${pinned} | ${catalog.total} cases | NiiVue ${catalog.viewer.version}`;
  fillFacets(catalog.facets);
  buildWindowButtons(catalog.windows);
}

function filterQuery() {
  const params = new URLSearchParams();
  const form = $("#filters");
  for (const name of FILTERS) {
    if (form.elements[name].value) params.set(name, form.elements[name].value);
  }
  return params;
}

async function loadList() {
  const listing = await getJSON(`/api/samples?${filterQuery()}`);
  $("#count").classList.remove("error");
  const more = listing.total > listing.count ? ` (showing ${listing.count})` : "";
  $("#count").textContent = `${listing.total} of ${state.catalog.total} cases${more}`;
  const rows = listing.samples.map((c) => {
    const qc = c.qc_pass ? "pass" : "fail";
    const tr = el("tr", { dataset: { sampleId: c.sample_id }, title: c.sample_id }, [
      el("td", { textContent: c.sample_id }),
      el("td", { textContent: c.cohort ?? "" }),
      el("td", { textContent: c.body_region ?? "" }),
      el("td", { textContent: c.pathology ?? "" }),
      el("td", { textContent: c.status === "passed" ? qc : `${qc} (${c.status})` }),
    ]);
    if (c.status !== "passed") tr.classList.add("failed");
    if (c.sample_id === state.selected) tr.classList.add("selected");
    tr.addEventListener("click", () => openCase(c));
    return tr;
  });
  $("#cases tbody").replaceChildren(...rows);
}

// -- viewer ------------------------------------------------------------------------------------------

function buildWindowButtons(windows) {
  const box = $("#windows");
  const buttons = windows.map((w) =>
    el("button", {
      type: "button", textContent: w.title, title: `W${w.width_hu} / L${w.level_hu} HU`,
      dataset: { window: w.key, min: w.min_hu, max: w.max_hu },
    }));
  buttons.push(el("button", {
    type: "button", textContent: "Auto", title: "robust intensity range of the volume",
    dataset: { window: AUTO_WINDOW },
  }));
  for (const b of buttons) b.addEventListener("click", () => applyWindow(b.dataset.window));
  box.replaceChildren(...buttons);
  if (!state.windowKey) state.windowKey = windows.length ? windows[0].key : AUTO_WINDOW;
  markActive("#windows", "window", state.windowKey);
}

function markActive(groupSelector, attribute, key) {
  for (const b of document.querySelectorAll(`${groupSelector} button`)) {
    b.classList.toggle("active", b.dataset[attribute] === key);
  }
}

function applyWindow(key) {
  state.windowKey = key;
  markActive("#windows", "window", key);
  const nv = state.nv;
  if (!nv || nv.volumes.length === 0) return;
  const image = nv.volumes[0];
  const button = document.querySelector(`#windows button[data-window="${key}"]`);
  if (key === AUTO_WINDOW || !button) {
    image.cal_min = image.robust_min;
    image.cal_max = image.robust_max;
  } else {
    image.cal_min = Number(button.dataset.min);
    image.cal_max = Number(button.dataset.max);
  }
  nv.updateGLVolume();
}

function setCaseWindows(modality) {
  // HU windows only mean something for CT; other modalities use the volume's own range.
  const isCT = (modality || "CT") === "CT";
  for (const b of document.querySelectorAll("#windows button")) {
    b.disabled = !isCT && b.dataset.window !== AUTO_WINDOW;
  }
  if (!isCT) state.windowKey = AUTO_WINDOW;
}

function showLegend(labelVolume) {
  const counts = new Map();
  const img = labelVolume.img;
  for (let i = 0; i < img.length; i++) {
    const v = img[i];
    if (v !== 0) counts.set(v, (counts.get(v) || 0) + 1);
  }
  const colours = state.labels;
  const items = [...counts.keys()].sort((a, b) => a - b).map((id) => {
    const k = colours.I.indexOf(id);
    const name = state.labelNames.get(id) || `label ${id}`;
    const hidden = k >= 0 && colours.A[k] === 0;
    const colour = k >= 0 ? `rgb(${colours.R[k]},${colours.G[k]},${colours.B[k]})` : "#888";
    return el("li", { title: `ID ${id}, ${counts.get(id)} voxels` }, [
      el("span", { className: "swatch", style: { background: hidden ? "transparent" : colour,
                                                 border: hidden ? "1px dashed #888" : "none" } }),
      `${id} ${name}${hidden ? " (not drawn)" : ""}`,
    ]);
  });
  $("#legend").replaceChildren(...items);
}

async function showDetails(sampleId, token) {
  const details = $("#details");
  try {
    const row = await getJSON(`/api/samples/${encodeURIComponent(sampleId)}`);
    if (token !== state.loadToken) return;
    const entries = Object.entries(row).filter(([k, v]) => v !== null && !DETAIL_SKIP.has(k));
    details.replaceChildren(...entries.flatMap(([k, v]) => [
      el("dt", { textContent: k }),
      el("dd", { textContent: typeof v === "object" ? JSON.stringify(v) : String(v) }),
    ]));
  } catch (error) {
    showError(details, error);
  }
}

async function openCase(c) {
  const token = ++state.loadToken;
  state.selected = c.sample_id;
  for (const tr of document.querySelectorAll("#cases tbody tr")) {
    tr.classList.toggle("selected", tr.dataset.sampleId === c.sample_id);
  }
  document.body.dataset.case = c.sample_id;
  document.body.dataset.caseState = "loading";
  $("#case-title").textContent = c.sample_id;
  $("#legend").replaceChildren();
  $("#location").classList.remove("error");
  showDetails(c.sample_id, token);
  if (!c.image_url) {
    $("#location").textContent = `${c.sample_id} has no volumes (status ${c.status}).`;
    document.body.dataset.caseState = "error";
    return;
  }
  $("#location").textContent = "loading…";
  const started = performance.now();
  try {
    const nv = state.nv;
    const fileName = (url) => `${c.sample_id}_${url.split("/").pop()}`;  // keeps .nii.gz or .nii
    const volumes = [{ url: c.image_url, name: fileName(c.image_url), colormap: "gray" }];
    if (c.label_url) {
      volumes.push({ url: c.label_url, name: fileName(c.label_url), opacity: Number($("#label-opacity").value) });
    }
    await nv.loadVolumes(volumes);
    if (token !== state.loadToken) return;  // a newer click won
    timings.caseFetchMs = performance.now() - started;
    if (nv.volumes.length > 1) {
      nv.volumes[1].hdr.intent_code = NIFTI_INTENT_LABEL;
      nv.volumes[1].setColormapLabel(state.labels);
      showLegend(nv.volumes[1]);
    }
    setCaseWindows(c.modality);
    applyWindow(state.windowKey);
    nv.drawScene();
    await new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)));
    if (token !== state.loadToken) return;
    timings.caseRenderMs = performance.now() - started;
    $("#location").textContent = "Click or drag in the view; the label under the crosshair is named here.";
    document.body.dataset.caseState = "rendered";
  } catch (error) {
    if (token !== state.loadToken) return;
    showError($("#location"), error);
    document.body.dataset.caseState = "error";
  }
}

function setView(name) {
  markActive("#views", "view", name);
  state.nv.setSliceType(VIEWS[name](state.nv));
}

async function startViewer() {
  const nv = new niivue.Niivue({
    backColor: [0, 0, 0, 1],
    show3Dcrosshair: true,
    dragAndDropEnabled: false,
    loadingText: "",
    isColorbar: false,
    isRadiologicalConvention: true,  // CT is read with the patient's right on the screen's left
  });
  await nv.attachTo("gl");
  nv.setSliceType(nv.sliceTypeMultiplanar);
  nv.onLocationChange = (data) => { $("#location").textContent = data.string; };
  state.nv = nv;
}

async function start() {
  try {
    const [labels] = await Promise.all([getJSON("/api/labels"), startViewer(), loadCatalog()]);
    state.labels = labels;
    labels.I.forEach((id, k) => state.labelNames.set(id, labels.labels[k]));
    await loadList();
    document.body.dataset.state = "ready";
  } catch (error) {
    showError($("#count"), error);
    document.body.dataset.state = "error";
  }
  timings.pageReadyMs = performance.now();  // since navigation start: includes loading NiiVue

  $("#filters").addEventListener("change", () => loadList().catch((e) => showError($("#count"), e)));
  $("#reload").addEventListener("click", async () => {
    try {
      await loadCatalog();
      await loadList();
    } catch (error) {
      showError($("#count"), error);
    }
  });
  for (const b of document.querySelectorAll("#views button")) {
    b.addEventListener("click", () => setView(b.dataset.view));
  }
  $("#label-opacity").addEventListener("input", (event) => {
    if (state.nv.volumes.length > 1) state.nv.setOpacity(1, Number(event.target.value));
  });
}

start();
