"""Azure Functions entry (Python v2 model): a timer that runs one alerter cycle."""

import logging

import azure.functions as func

from alerter import redact
from alerter.cycle import run_cycle
from alerter.settings import Settings
from alerter.summary import format_summary

app = func.FunctionApp()


class CycleFailed(RuntimeError):
    """Raised so the Functions host records a failed run, which Application Insights alerts on."""


@app.timer_trigger(schedule="%ALERT_SCHEDULE%", arg_name="timer", run_on_startup=False, use_monitor=True)
def alerter_timer(timer: func.TimerRequest) -> None:
    settings = Settings.load()
    redact.install(settings.redactor())
    if timer.past_due:
        logging.warning("the timer is past due: this run catches up on the missed schedule")
    try:
        report = run_cycle(settings)
    except Exception as error:  # the host logs what is raised: make sure it carries no secret
        raise CycleFailed(settings.redactor()(f"the cycle stopped: {type(error).__name__}: {error}")) from None
    logging.info("%s", format_summary(report))
    if not report.ok:
        raise CycleFailed(f"run {report.run.id} failed; what worked is recorded, the rest retries next run")
