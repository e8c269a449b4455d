// Parse and validate Adaptive Cards with the Adaptive Cards JavaScript library (npm
// `adaptivecards`), the renderer family Teams uses. Reads a JSON array of cards on stdin and
// writes a JSON array with one list of events per card: parse events (unknown element types,
// invalid property values, ...) and validateProperties() failures (missing required
// properties, duplicate ids, ...). A valid card has an empty list.
//
//   echo '[{"type":"AdaptiveCard","version":"1.4","body":[]}]' | node tests/support/adaptive_cards.js [--version 1.4]
//
// Plain require("adaptivecards") fails on Node 20; the minified UMD bundle works.
"use strict";

const path = require("path");
const AC = require(path.join(__dirname, "..", "..", "node_modules", "adaptivecards", "dist", "adaptivecards.min.js"));

function targetVersion(argv) {
  const index = argv.indexOf("--version");
  const wanted = index >= 0 ? argv[index + 1] : "1.4";
  const version = AC.Versions[`v${wanted.replace(".", "_")}`];
  if (!version) throw new Error(`unknown Adaptive Card version ${wanted}`);
  return version;
}

function describe(event) {
  return {
    phase: AC.ValidationPhase[event.phase],
    event: AC.ValidationEvent[event.event],
    message: event.message,
  };
}

function check(json, version) {
  const events = [];
  const card = new AC.AdaptiveCard();
  const context = new AC.SerializationContext(version);
  card.parse(json, context);
  for (let i = 0; i < context.eventCount; i++) events.push(describe(context.getEventAt(i)));
  for (const event of card.validateProperties().validationEvents) events.push(describe(event));
  return events;
}

function main() {
  const version = targetVersion(process.argv.slice(2));
  const chunks = [];
  process.stdin.on("data", (chunk) => chunks.push(chunk));
  process.stdin.on("end", () => {
    const cards = JSON.parse(Buffer.concat(chunks).toString("utf8"));
    if (!Array.isArray(cards)) throw new Error("expected a JSON array of cards on stdin");
    process.stdout.write(JSON.stringify(cards.map((card) => check(card, version))));
  });
}

main();
