#!/usr/bin/env node
// Render a Teams payload (the POST body the Teams notifier writes with --preview, or a bare
// Adaptive Card) to a PNG with the Adaptive Cards JavaScript library in headless Chromium.
// Given an .html file (the mail preview), it takes a picture of that page instead.
//
//   node tools/card_preview.js .demo/preview/teams-<id>-1.json docs/teams-card.png [--width 680]
//   node tools/card_preview.js .demo/preview/email-<id>-1.html docs/email.png --width 900
//
// Chromium: Debian's `chromium` package (apt-get install chromium), or set CHROMIUM=/path.
// It runs twice, offline, with a throw-away profile: once to measure the rendered card's
// height (--dump-dom), once to take the screenshot at exactly that size.
"use strict";

const fs = require("fs");
const os = require("os");
const path = require("path");
const { execFileSync } = require("child_process");

const ROOT = path.resolve(__dirname, "..");
const LIBRARY = path.join(ROOT, "node_modules", "adaptivecards", "dist", "adaptivecards.min.js");

// Close to Teams' light theme: its fonts, text colours and the container styles the card uses.
const HOST_CONFIG = {
  fontFamily: "'Segoe UI', 'Liberation Sans', 'DejaVu Sans', sans-serif",
  spacing: { small: 4, default: 8, medium: 16, large: 20, extraLarge: 24, padding: 16 },
  separator: { lineThickness: 1, lineColor: "#E0E0E0" },
  fontSizes: { small: 12, default: 14, medium: 16, large: 20, extraLarge: 24 },
  fontWeights: { lighter: 200, default: 400, bolder: 600 },
  fontTypes: {
    default: { fontFamily: "'Segoe UI', 'Liberation Sans', 'DejaVu Sans', sans-serif",
      fontSizes: { small: 12, default: 14, medium: 16, large: 20, extraLarge: 24 },
      fontWeights: { lighter: 200, default: 400, bolder: 600 } },
    monospace: { fontFamily: "'Cascadia Mono', 'DejaVu Sans Mono', monospace",
      fontSizes: { small: 12, default: 14, medium: 16, large: 20, extraLarge: 24 },
      fontWeights: { lighter: 200, default: 400, bolder: 600 } },
  },
  containerStyles: {
    default: { backgroundColor: "#FFFFFF", foregroundColors: {
      default: { default: "#242424", subtle: "#616161" }, accent: { default: "#5B5FC7", subtle: "#5B5FC7" },
      attention: { default: "#C4314B", subtle: "#C4314B" }, good: { default: "#237B4B", subtle: "#237B4B" },
      warning: { default: "#835C00", subtle: "#835C00" } } },
    emphasis: { backgroundColor: "#F5F5F5" },
    attention: { backgroundColor: "#FCF4F6", foregroundColors: {
      default: { default: "#242424", subtle: "#616161" } } },
  },
  actions: { maxActions: 6, spacing: "default", buttonSpacing: 8, actionsOrientation: "horizontal",
    actionAlignment: "left", showCard: { actionMode: "inline" } },
  supportsInteractivity: true,
};

const PAGE_CSS = `
  body { margin: 0; padding: 16px; background: #F0F0F0; font-family: 'Liberation Sans', sans-serif; }
  #frame { background: #FFFFFF; border-radius: 6px; box-shadow: 0 1px 3px rgba(0,0,0,.18); overflow: hidden; }
  .ac-pushButton { font-family: inherit; font-size: 14px; font-weight: 600; padding: 5px 12px;
    border: 1px solid #D1D1D1; border-radius: 4px; background: #FFFFFF; color: #242424; }
`;

function usage(message) {
  if (message) console.error(`card_preview: ${message}`);
  console.error("usage: node tools/card_preview.js PAYLOAD.json OUT.png [--width PIXELS]");
  process.exit(2);
}

function findChromium() {
  const candidates = [process.env.CHROMIUM, "chromium", "chromium-browser", "google-chrome"].filter(Boolean);
  for (const name of candidates) {
    try {
      execFileSync(name, ["--version"], { stdio: "ignore" });
      return name;
    } catch (error) {
      // try the next one
    }
  }
  usage("no Chromium found: apt-get install chromium (Debian), or set CHROMIUM=/path/to/chrome");
}

function cardFrom(document) {
  if (document && document.type === "message" && Array.isArray(document.attachments)) {
    const attachment = document.attachments.find((a) => a.contentType === "application/vnd.microsoft.card.adaptive");
    if (!attachment) usage("the message has no Adaptive Card attachment");
    return attachment.content;
  }
  if (document && document.type === "AdaptiveCard") return document;
  usage("expected a Teams message payload or an Adaptive Card");
}

function page(card, width) {
  // JSON inside a <script> element: `<` escaped so no value can close the element.
  const data = JSON.stringify({ card, hostConfig: HOST_CONFIG }).replace(/</g, "\\u003c");
  return `<!doctype html><html><head><meta charset="utf-8"><style>${PAGE_CSS}</style>
<script src="file://${LIBRARY}"></script></head>
<body><div id="frame" style="width:${width}px"></div><pre id="height" hidden></pre>
<script>
  const input = ${data};
  const card = new AdaptiveCards.AdaptiveCard();
  card.hostConfig = new AdaptiveCards.HostConfig(input.hostConfig);
  card.parse(input.card, new AdaptiveCards.SerializationContext(AdaptiveCards.Versions.v1_4));
  const element = card.render();
  if (element) document.getElementById("frame").appendChild(element);
  document.getElementById("height").textContent = String(document.body.scrollHeight);
</script></body></html>`;
}

const MEASURE = `<pre id="height" hidden></pre><script>
  document.getElementById("height").textContent = String(document.documentElement.scrollHeight);
</script>`;

function mailPage(html) {
  // Our own template's output: add the measuring script before </body>.
  const at = html.lastIndexOf("</body>");
  if (at < 0) usage("the HTML file has no </body>");
  return html.slice(0, at) + MEASURE + html.slice(at);
}

function chromium(binary, profile, args) {
  const flags = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
    "--allow-file-access-from-files", `--user-data-dir=${profile}`,
  ];
  return execFileSync(binary, [...flags, ...args], { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"],
    timeout: 60000 });
}

function main(argv) {
  const positional = [];
  let width = 680;
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--width") width = Number(argv[++i]);
    else positional.push(argv[i]);
  }
  if (positional.length !== 2 || !(width >= 200 && width <= 2000)) usage();
  const [input, output] = positional.map((p) => path.resolve(p));
  const isHtml = input.toLowerCase().endsWith(".html");
  const text = fs.readFileSync(input, "utf8");
  const content = isHtml ? mailPage(text) : page(cardFrom(JSON.parse(text)), width);
  const binary = findChromium();
  const work = fs.mkdtempSync(path.join(os.tmpdir(), "card-preview-"));
  try {
    const html = path.join(work, "card.html");
    fs.writeFileSync(html, content);
    const url = `file://${html}`;
    const dom = chromium(binary, path.join(work, "profile-measure"), ["--dump-dom", url]);
    const match = /<pre id="height"[^>]*>(\d+)<\/pre>/.exec(dom);
    if (!match) throw new Error("the card did not render (no height in the page)");
    const height = Math.min(Number(match[1]), 16000);
    fs.mkdirSync(path.dirname(output), { recursive: true });
    chromium(binary, path.join(work, "profile-shot"),
      [`--window-size=${isHtml ? width : width + 32},${height}`, `--screenshot=${output}`, url]);
    if (!fs.existsSync(output)) throw new Error("Chromium wrote no screenshot");
    console.log(`${output}: ${isHtml ? width : width + 32}x${height}`);
  } finally {
    fs.rmSync(work, { recursive: true, force: true });
  }
}

main(process.argv.slice(2));
