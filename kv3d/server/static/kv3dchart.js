// kv3dchart: the dashboard's own small line chart on a <canvas> (no dependencies, no CDN).
// new KV3DChart(canvas, {series: ["a", "b"], unit: "s", maxPoints: 300})
// chart.push(timestampMs, {a: 1.5, b: null}); chart.draw() is called by push.
"use strict";

const KV3D_COLORS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2"];

class KV3DChart {
  constructor(canvas, options) {
    this.canvas = canvas;
    this.series = options.series;
    this.unit = options.unit || "";
    this.maxPoints = options.maxPoints || 300;
    this.format = options.format || KV3DChart.compact;
    this.points = []; // [timestampMs, {name: value|null}]
  }

  static compact(value) {
    if (value === null || value === undefined || Number.isNaN(value)) return "–";
    const abs = Math.abs(value);
    if (abs >= 1e9) return (value / 1e9).toFixed(1) + "G";
    if (abs >= 1e6) return (value / 1e6).toFixed(1) + "M";
    if (abs >= 1e3) return (value / 1e3).toFixed(1) + "k";
    if (abs >= 10 || value === 0) return value.toFixed(0);
    return value.toPrecision(2);
  }

  push(timestampMs, values) {
    this.points.push([timestampMs, values]);
    if (this.points.length > this.maxPoints) this.points.shift();
    this.canvas.dataset.points = String(this.points.length);
    this.draw();
  }

  range() {
    let lo = Infinity, hi = -Infinity;
    for (const [, values] of this.points) {
      for (const name of this.series) {
        const v = values[name];
        if (v === null || v === undefined || Number.isNaN(v)) continue;
        lo = Math.min(lo, v);
        hi = Math.max(hi, v);
      }
    }
    if (lo === Infinity) return [0, 1];
    lo = Math.min(lo, 0);
    if (hi <= lo) hi = lo + 1;
    return [lo, hi * 1.1];
  }

  draw() {
    const c = this.canvas, ctx = c.getContext("2d");
    const ratio = window.devicePixelRatio || 1;
    const w = c.clientWidth || 400, h = c.clientHeight || 180;
    if (c.width !== w * ratio) { c.width = w * ratio; c.height = h * ratio; }
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const left = 48, right = 8, top = 22, bottom = 18;
    const [lo, hi] = this.range();
    const y = v => top + (h - top - bottom) * (1 - (v - lo) / (hi - lo));
    ctx.font = "11px system-ui, sans-serif";
    ctx.strokeStyle = "#e5e7eb";
    ctx.fillStyle = "#6b7280";
    for (let i = 0; i <= 4; i++) {
      const v = lo + (hi - lo) * i / 4, yy = y(v);
      ctx.beginPath(); ctx.moveTo(left, yy); ctx.lineTo(w - right, yy); ctx.stroke();
      ctx.fillText(this.format(v) + this.unit, 2, yy + 4);
    }
    const n = this.points.length;
    const x = i => left + (w - left - right) * (n <= 1 ? 1 : i / (n - 1));
    this.series.forEach((name, k) => {
      const color = KV3D_COLORS[k % KV3D_COLORS.length];
      ctx.strokeStyle = color;
      ctx.lineWidth = 2;
      ctx.beginPath();
      let drawing = false;
      this.points.forEach(([, values], i) => {
        const v = values[name];
        if (v === null || v === undefined || Number.isNaN(v)) { drawing = false; return; }
        if (drawing) ctx.lineTo(x(i), y(v)); else ctx.moveTo(x(i), y(v));
        drawing = true;
      });
      ctx.stroke();
      const last = n ? this.points[n - 1][1][name] : null;
      ctx.fillStyle = color;
      ctx.fillText(name + " " + this.format(last) + this.unit, left + 4 + k * 110, 12);
    });
  }
}

window.KV3DChart = KV3DChart;
