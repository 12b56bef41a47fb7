"""The status page `GET /` serves on the --metrics port: one self-contained HTML page (no
external script, font or style; works offline) that asks `/connections` every second and
shows each open connection with a bar split by path, and the totals per local address.

Every value from the proxy reaches the page as text (textContent, createElement, CSSOM
numbers), never as markup; the Content-Security-Policy sent with it (POLICY) allows this
page's own script and style only, by their hashes, and fetches to the same origin.
A Python string rather than a data file: the wheel carries it like any module.
"""

from __future__ import annotations

import base64
import hashlib

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1em 2em; color: #222; background: #fff; }
h1 { font-size: 1.3em; margin: 0 0 .2em; }
h2 { font-size: 1.05em; margin: 1.4em 0 .4em; }
#status { color: #555; margin: 0; }
#status.error { color: #b00; }
.conn { border-top: 1px solid #ddd; padding: .5em 0; }
.head span { margin-right: 1.2em; white-space: nowrap; }
.head .id { font-weight: bold; }
.bar { display: flex; height: 14px; background: #eee; margin: .3em 0; max-width: 60em; }
.seg { height: 100%; min-width: 2px; }
.bar.small { width: 10em; height: 10px; margin: 0; }
.paths { list-style: none; margin: 0; padding: 0; font-family: ui-monospace, monospace;
         font-size: 12.5px; }
.paths li span { margin-right: 1em; }
.swatch { display: inline-block; width: .9em; height: .9em; vertical-align: middle; }
.closed { color: #888; text-decoration: line-through; }
.note { color: #777; }
table { border-collapse: collapse; }
th, td { text-align: left; padding: .15em 1em .15em 0; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
"""

_SCRIPT = """
"use strict";
const COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
                 "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let v = Number(n), i = 0;
  while (v >= 1000 && i < units.length - 1) { v /= 1000; i++; }
  return (i ? v.toFixed(1) : String(v)) + " " + units[i];
}

function age(s) {
  if (s === null || s === undefined) return "-";
  s = Number(s);
  if (s < 60) return s.toFixed(1) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + Math.floor(s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor(s % 3600 / 60) + " min";
}

function mptcp(c) {
  if (c.state === "connecting") return "connecting";
  if (c.mptcp === null) return "MPTCP off";
  if (!c.mptcp) return "MPTCP no (fell back to TCP)";
  return "MPTCP yes, " + c.subflows + " subflow" + (c.subflows === 1 ? "" : "s");
}

function hostOf(addr) {
  // "10.0.1.1:40000" or "[2001:db8::1]:40000" -> the address alone
  const s = String(addr);
  if (s.startsWith("[")) return s.slice(1, s.indexOf("]"));
  return s.slice(0, s.lastIndexOf(":"));
}

function colourOf(colours, addr) {
  const i = colours.get(addr === null ? null : hostOf(addr));
  return i === undefined ? "#999" : COLOURS[i % COLOURS.length];
}

function route(p) {
  // id 0 is no subflow: the bytes of closed subflows that the samples missed
  return p.id ? p.local + " \\u2192 " + p.remote : "closed subflows";
}

function pathItem(p, colours) {
  const li = el("li", p.closed ? "path closed" : "path");
  const sw = el("span", "swatch");
  sw.style.backgroundColor = colourOf(colours, p.local);
  li.append(sw, el("span", "route", route(p)),
            el("span", "share", Math.round(Number(p.share)) + " %"),
            el("span", "", "sent " + bytes(p.bytes_sent)),
            el("span", "", "acked " + bytes(p.bytes_acked)),
            el("span", "", "received " + bytes(p.bytes_received)),
            el("span", "", "retransmitted " + bytes(p.bytes_retrans)),
            el("span", "", "rtt " + (Number(p.rtt_us) / 1000).toFixed(1) + " ms"));
  if (p.closed) li.append(el("span", "note", "(closed)"));
  return li;
}

function connection(c, colours) {
  const box = el("div", "conn");
  box.dataset.id = String(c.id);
  const head = el("div", "head");
  head.append(el("span", "id", "conn " + c.id),
              el("span", "listener", "listener " + (c.listener ?? "-")),
              el("span", "client", "client " + (c.client ?? "unknown")
                                   + (c.via ? " via " + c.via : "")),
              el("span", "upstream", "upstream " + (c.upstream ?? "unknown")),
              el("span", "age", age(c.age_s)),
              el("span", "", "\\u2191 " + bytes(c.bytes_client_to_upstream)),
              el("span", "", "\\u2193 " + bytes(c.bytes_upstream_to_client)),
              el("span", "mptcp", mptcp(c)));
  box.append(head);
  if (!c.paths.length) {
    if (c.state !== "connecting")
      box.append(el("div", "note", c.mptcp ? "no per-path data (path sampling off, or a "
                                            + "kernel before 6.5)" : "one path"));
    return box;
  }
  const bar = el("div", "bar");
  for (const p of c.paths) {
    const seg = el("span", "seg");
    seg.style.width = Math.max(0, Math.min(100, Number(p.share) || 0)) + "%";
    seg.style.backgroundColor = colourOf(colours, p.local);
    seg.title = route(p) + ": " + Math.round(Number(p.share)) + " %";
    bar.append(seg);
  }
  const ul = el("ul", "paths");
  for (const p of c.paths) ul.append(pathItem(p, colours));
  box.append(bar, ul);
  return box;
}

function localsTable(locals, colours) {
  const table = el("table");
  const head = el("tr");
  for (const h of ["", "local address", "paths", "share", "", "sent", "received",
                   "retransmitted"])
    head.append(el("th", "", h));
  table.append(head);
  for (const l of locals) {
    const tr = el("tr", "local");
    const sw = el("span", "swatch");
    sw.style.backgroundColor = COLOURS[colours.get(l.address) % COLOURS.length];
    const first = el("td");
    first.append(sw);
    const bar = el("div", "bar small"), seg = el("span", "seg"), barCell = el("td");
    seg.style.width = Math.max(0, Math.min(100, Number(l.share) || 0)) + "%";
    seg.style.backgroundColor = sw.style.backgroundColor;
    bar.append(seg);
    barCell.append(bar);
    tr.append(first, el("td", "address", l.address ?? "closed subflows"),
              el("td", "n", l.paths), el("td", "n", Math.round(Number(l.share)) + " %"),
              barCell,
              el("td", "n", bytes(l.bytes_sent)), el("td", "n", bytes(l.bytes_received)),
              el("td", "n", bytes(l.bytes_retrans)));
    table.append(tr);
  }
  return table;
}

function render(doc) {
  const colours = new Map();
  doc.locals.forEach((l, i) => colours.set(l.address, i));
  const list = document.getElementById("connections");
  list.replaceChildren(...doc.connections.map(c => connection(c, colours)));
  if (!doc.connections.length) list.append(el("p", "note", "no open connection"));
  const locals = document.getElementById("locals");
  locals.replaceChildren(doc.locals.length ? localsTable(doc.locals, colours)
                                           : el("p", "note", "no path data"));
  const n = doc.connections.length;
  const status = document.getElementById("status");
  status.className = "";
  status.textContent = n + " open connection" + (n === 1 ? "" : "s") + ", updated "
                       + new Date().toLocaleTimeString();
}

async function refresh() {
  try {
    const resp = await fetch("/connections", {cache: "no-store"});
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    render(await resp.json());
  } catch (err) {
    const status = document.getElementById("status");
    status.className = "error";
    status.textContent = "cannot read /connections: " + err.message;
  } finally {
    setTimeout(refresh, 1000);
  }
}
refresh();
"""

_HTML = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mptcp-proxy: live connections</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>mptcp-proxy: live connections</h1>
<p id="status">loading&hellip;</p>
<h2>Connections</h2>
<div id="connections"></div>
<h2>Per local address</h2>
<div id="locals"></div>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


PAGE = _HTML.encode()
POLICY = (f"default-src 'none'; script-src {_hash(_SCRIPT)}; style-src {_hash(_STYLE)}; "
          "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
