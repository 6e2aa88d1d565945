// usae concept explorer: heatmap drawing, and sorting / filtering of the concept table.
// No dependencies and no network: pages open from disk (file://) as well as from a web server.
"use strict";

(function () {
  const body = document.body;
  const grid = (body.dataset.grid || "1,1").split(",").map(Number);
  const alpha = Number(body.dataset.alpha || "0.7");
  const lut = window.USAE_LUT || [];  // 256 RGB colours, from assets/colormap.js

  // One byte per token (hex, row-major on the store grid) -> a small RGBA canvas whose colour and
  // opacity grow with the value; the browser's bilinear filter upsamples it over the image.
  function drawHeat(canvas) {
    const hex = canvas.dataset.heat || "";
    const [h, w] = grid;
    if (hex.length !== 2 * h * w || !lut.length) return;
    const small = document.createElement("canvas");
    small.width = w;
    small.height = h;
    const sctx = small.getContext("2d");
    const data = sctx.createImageData(w, h);
    for (let i = 0; i < h * w; i++) {
      const v = parseInt(hex.substr(2 * i, 2), 16);
      const c = lut[v];
      data.data.set([c[0], c[1], c[2], Math.round(255 * alpha * v / 255)], 4 * i);
    }
    sctx.putImageData(data, 0, 0);
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = "high";
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.drawImage(small, 0, 0, canvas.width, canvas.height);
    canvas.dataset.drawn = "1";
  }
  document.querySelectorAll("canvas.heat").forEach(drawHeat);
  const toggle = document.getElementById("show-heat");
  if (toggle) toggle.addEventListener("change", () => body.classList.toggle("no-heat", !toggle.checked));

  const table = document.getElementById("concepts");
  if (!table) return;
  const tbody = table.tBodies[0];
  const headers = Array.from(table.tHead.rows[0].cells);
  const classFilter = document.getElementById("class-filter");
  const search = document.getElementById("search");
  const shown = document.getElementById("shown-count");

  function cellValue(row, col, type) {
    const v = row.cells[col].dataset.v;
    if (type === "num") return v === "" || v === undefined ? NaN : Number(v);
    return (v || "").toLowerCase();
  }

  // Numbers sort descending on the first click, text ascending; undefined values always go last.
  function sortBy(col) {
    const th = headers[col];
    const type = th.dataset.type;
    const current = th.getAttribute("aria-sort");
    const first = type === "num" ? "descending" : "ascending";
    const order = current === first ? (first === "ascending" ? "descending" : "ascending") : first;
    const sign = order === "ascending" ? 1 : -1;
    headers.forEach((h) => { if (h.dataset.type) h.setAttribute("aria-sort", "none"); });
    th.setAttribute("aria-sort", order);
    const rows = Array.from(tbody.rows);
    rows.sort((a, b) => {
      const x = cellValue(a, col, type), y = cellValue(b, col, type);
      if (type === "num") {
        if (Number.isNaN(x) || Number.isNaN(y)) return Number.isNaN(x) - Number.isNaN(y);
        return sign * (x - y);
      }
      return sign * x.localeCompare(y);
    });
    tbody.append(...rows);
  }
  headers.forEach((th, col) => {
    const button = th.querySelector("button");
    if (button) button.addEventListener("click", () => sortBy(col));
  });

  function applyFilter() {
    const cls = classFilter.value;
    const words = search.value.trim().toLowerCase().split(/\s+/).filter(Boolean);
    let n = 0;
    for (const row of tbody.rows) {
      const okClass = cls === "all" || (cls === "live" ? row.dataset.live === "1" : row.dataset.cls === cls);
      const text = (row.dataset.text || "").toLowerCase();  // ids, labels (all families), artifact marks
      const ok = okClass && words.every((word) => text.includes(word));
      row.hidden = !ok;
      n += ok ? 1 : 0;
    }
    shown.textContent = `showing ${n} of ${tbody.rows.length}`;
  }
  classFilter.addEventListener("change", applyFilter);
  search.addEventListener("input", applyFilter);
  applyFilter();
})();
