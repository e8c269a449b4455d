"""The run summary a person reads at the end of `alerter run` (and the timer logs)."""

from __future__ import annotations

from alerter.model import RunReport


def format_summary(report: RunReport) -> str:
    lines = [f"Run {report.run.id} at {report.run.at.strftime('%Y-%m-%dT%H:%M:%SZ')}"
             + (" (dry run: nothing sent, nothing recorded)" if report.dry_run else "")]
    for d in report.detections:
        if d.query_error:
            lines.append(f"{d.detection_name}: QUERY FAILED: {d.query_error}")
            continue
        line = f"{d.detection_name}: {d.devices} devices, {d.new} new, {d.known} already reported"
        extras = [f"{d.rows} rows"]
        if d.suppressed:
            extras.append(f"{d.suppressed} suppressed")
        if d.realerts:
            extras.append(f"{d.realerts} re-alerts")
        lines.append(f"{line} ({', '.join(extras)})")
        for reason in d.incomplete:
            lines.append(f"  INCOMPLETE RESULT: {reason}")
        for channel, outcome in sorted(d.channels.items()):
            text = f"  {channel}: {outcome.sent} delivered, {outcome.failed} left pending"
            if outcome.gave_up:
                text += f", {outcome.gave_up} gave up (failed)"
            lines.append(text)
            for error in dict.fromkeys(outcome.errors):
                lines.append(f"    error: {error}")
    if report.pending_carried_over:
        lines.append(f"Pending deliveries carried over from earlier runs: {report.pending_carried_over}")
    if report.failed_total:
        lines.append(f"FAILED deliveries (gave up, never sent): {report.failed_total} — see `alerter state list --failed`")
    for channel, messages in sorted(report.would_send.items()):
        devices = sum(len(m.sightings) for m in messages)
        lines.append(f"Would send to {channel}: {len(messages)} message(s), {devices} device(s)")
    if report.digest is not None:
        lines.append("Daily digest: " + ("prepared (dry run, not sent)" if report.dry_run else "sent to each configured channel"))
    for note in report.notes:
        lines.append(f"Note: {note}")
    for problem in report.problems:
        lines.append(f"PROBLEM: {problem}")
    result = "OK" if report.ok else "FAILED (exit status 1; what worked is recorded)"
    lines.append(f"Result: {result} in {report.seconds:.2f} s")
    return "\n".join(lines)
