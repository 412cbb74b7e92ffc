"""`tuneforge estimate`: the memory plan of a job before it runs (POST /v1/fine_tuning/estimate)."""

from typing import Annotated

import typer

from app.cli import jobs
from app.cli.client import OPTIONS, Client, show, table


def estimate(
    spec: jobs.SpecOption = None,
    model: jobs.ModelOption = None,
    training_file: jobs.TrainingOption = None,
    task: jobs.TaskOption = None,
    method: jobs.MethodOption = None,
    epochs: Annotated[int | None, typer.Option(help="n_epochs.")] = None,
    batch_size: int | None = None,
    set_: jobs.SetOption = None,
    methods: Annotated[
        str | None, typer.Option(help="Methods to compare, comma-separated, or 'all'.")
    ] = None,
    device: Annotated[str, typer.Option(help="cuda or cpu: the device to plan for.")] = "cuda",
    gpu_memory_gb: Annotated[float | None, typer.Option(help="Check each plan against this memory.")] = None,
) -> None:
    """Trainable parameters, memory and whether it fits, for each method, before a job runs."""
    with Client() as client:
        body = jobs.job_body(
            client,
            spec=spec,
            model=model,
            training_file=training_file,
            validation_file=None,
            task=task,
            method=method,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate_multiplier=None,
            suffix=None,
            seed=None,
            settings=set_ or [],
        )
        body["device"] = device
        if methods:
            body["methods"] = "all" if methods == "all" else [m.strip() for m in methods.split(",")]
        if gpu_memory_gb is not None:
            body["gpu_memory_gb"] = gpu_memory_gb
        plan = client.post("/v1/fine_tuning/estimate", json=body)
    rows = [
        (
            e["peft"],
            f"{e['trainable_parameters']:,}",
            f"{e['trainable_percent']:.3g}%",
            f"{e['per_gpu']['total'] / 2**30:.2f}",
            {True: "yes", False: "no", None: "-"}[e["fits"]],
            f"{e['estimated_seconds']:.0f}",
        )
        for e in plan["estimates"]
    ]
    title = f"{plan['model']} on {plan['device']}" + (
        f", {plan['gpu_memory_gb']:g} GiB" if plan["gpu_memory_gb"] else ""
    )
    columns = ("method", "trainable", "of all", "GiB per device", "fits", "seconds")
    show(plan, table(columns, rows, title=title))
    if plan.get("auto") and not OPTIONS.json:
        print(f"auto would choose {plan['auto']['chosen']}: {plan['auto']['reason']}")
