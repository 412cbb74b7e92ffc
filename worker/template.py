"""Imported first by the template process that training processes fork from (see worker/launcher.py).

A stop signal sent to the worker's whole process group (systemd's default, `kill -TERM -PGID`) must reach
each run, which then saves a checkpoint and exits, but not the template: the worker learns how a run
ended through the template, and a run whose template is gone is killed with it. Runs restore SIGTERM
when they start.
"""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
