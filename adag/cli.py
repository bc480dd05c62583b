"""The `adag` command: one subcommand per pipeline stage, plus a few to look around."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Annotated

import typer

from adag.errors import AdagError

app = typer.Typer(
    help="Trace and describe circuits of MLP neurons in transformer language models (ADAG).\n\n"
    "Pipeline: adag trace -> adag cluster -> adag info. Start with `adag models` and `adag datasets`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def friendly(command: Callable) -> Callable:
    """Print an AdagError as one line on stderr and exit 2, instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except AdagError as error:
            typer.echo(f"error: {error}", err=True)
            sys.exit(2)

    return wrapper


@app.command()
@friendly
def models() -> None:
    """List the built-in models and the supported model families."""
    from adag.models import ADAPTERS, BUILTIN_MODELS

    typer.echo("Built-in models (no download needed):")
    for name, builtin in BUILTIN_MODELS.items():
        typer.echo(f"  {name:16s} {builtin.description}")
    typer.echo("\nAlso accepted: a local Hugging Face model directory, or a hub id such as org/name.")
    typer.echo(f"Supported families (config.model_type): {', '.join(sorted(ADAPTERS))}")


@app.command()
@friendly
def datasets() -> None:
    """List the built-in datasets with their sizes."""
    from adag.datasets import BUILTIN_DATASETS

    typer.echo("Built-in datasets:")
    for name, (make, description) in BUILTIN_DATASETS.items():
        typer.echo(f"  {name:18s} {len(make()):4d} prompts  {description}")
    typer.echo("\nOr a .jsonl/.csv file with fields prompt, seed_response, labels (list) and metadata.")


@app.command()
@friendly
def info(run_dir: Annotated[str, typer.Argument(help="a run directory")]) -> None:
    """Summarise a run directory: model, dataset, stages with their status and timings."""
    from adag.store import RunDir

    manifest = RunDir.open(run_dir).manifest
    model, dataset = manifest["model"], manifest["dataset"]
    typer.echo(f"run      {run_dir}  (adag {manifest['adag_version']}, created {manifest['created']})")
    typer.echo(f"model    {model['spec']}  family={model['family']} layers={model['layers']} "
               f"neurons/layer={model['neurons']} weights={model['weights']}")
    typer.echo(f"dataset  {dataset['name']}  rows={dataset['rows']} sha256={dataset['sha256']}")
    for stage, entry in manifest["stages"].items():
        facts = {k: v for k, v in entry.items() if k not in ("status", "started", "seconds")}
        seconds = entry.get("seconds")
        timing = f"{seconds:.1f}s" if seconds is not None else "-"
        typer.echo(f"stage    {stage:8s} {entry['status']:8s} {timing:>8s}  {json.dumps(facts)}")


@app.command()
@friendly
def trace(
    model: Annotated[str, typer.Option(help="built-in name, local model directory or hub id")],
    dataset: Annotated[str, typer.Option(help="built-in dataset name or a .jsonl/.csv file")],
    out: Annotated[str, typer.Option(help="run directory to create (or resume)")],
    limit: Annotated[int | None, typer.Option(help="trace only the first N prompts")] = None,
    metric: Annotated[str, typer.Option(help="topk, labels or logit_diff")] = "topk",
    k: Annotated[int, typer.Option(help="top-k next tokens in the metric")] = 5,
    threshold: Annotated[float, typer.Option(help="keep nodes with |RelP| >= threshold * |m|")] = 0.005,
    selection: Annotated[str, typer.Option(help="threshold or topk")] = "threshold",
    top_nodes: Annotated[int, typer.Option(help="nodes kept with --selection topk")] = 200,
    aggregation: Annotated[str, typer.Option(help="none, any or mean over the dataset")] = "any",
    rules: Annotated[str, typer.Option(help="half, no_half or plain")] = "half",
    profiles: Annotated[str, typer.Option(help="total or direct effects in profiles")] = "total",
    batch_size: Annotated[int, typer.Option(help="prompts per batch")] = 4,
    chunk_size: Annotated[int, typer.Option(help="nodes per batched VJP (bounds memory)")] = 64,
    edge_threshold: Annotated[float, typer.Option(help="drop edges with |w| below this")] = 0.01,
    no_edges: Annotated[bool, typer.Option("--no-edges", help="skip the edge pass")] = False,
    keep_first_position: Annotated[bool, typer.Option(help="allow nodes at position 0")] = False,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto (spread over GPUs)")] = "cpu",
) -> None:
    """Trace attribution graphs, profiles and edges for every prompt of a dataset."""
    from pydantic import ValidationError

    from adag.datasets import load_dataset
    from adag.models import load_model
    from adag.trace import TraceConfig, trace_dataset

    try:
        config = TraceConfig(metric=metric, k=k, threshold=threshold, selection=selection, top_nodes=top_nodes,
                             aggregation=aggregation, rules=rules, profiles=profiles, batch_size=batch_size,
                             chunk_size=chunk_size, edge_threshold=edge_threshold, edges=not no_edges,
                             keep_first_position=keep_first_position)
    except ValidationError as error:
        first = error.errors()[0]
        raise AdagError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None
    rows = load_dataset(dataset, limit=limit)
    lm = load_model(model, dtype=dtype, device=device)
    run = trace_dataset(lm, rows, config, out)
    facts = run.manifest["stages"]["trace"]
    typer.echo(f"traced {facts['prompts']} prompts: {facts['nodes']} nodes, {facts['edges']} edges "
               f"in {facts['seconds']:.1f}s -> {out}")


@app.command()
@friendly
def cluster(
    run_dir: Annotated[str, typer.Argument(help="a traced run directory")],
    k: Annotated[str, typer.Option(help="number of clusters, or 'auto' for the eigengap's suggestion")] = "20",
    method: Annotated[str, typer.Option(help="spectral, agglomerative, kmeans or leiden")] = "spectral",
    combine: Annotated[str, typer.Option(help="harmonic or mean of the input and output views, "
                                         "or one view alone: input, output")] = "harmonic",
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
) -> None:
    """Cluster traced half-neurons by their attribution profiles and build the cluster graph."""
    from pydantic import ValidationError

    from adag.cluster import ClusterConfig, cluster_run

    try:
        config = ClusterConfig(k=k if k == "auto" else int(k), method=method, combine=combine, seed=seed)
    except (ValueError, ValidationError):
        raise AdagError(f"bad clustering options (--k {k} --method {method} --combine {combine}); "
                        "--k takes a number or 'auto'") from None
    run = cluster_run(run_dir, config)
    facts = run.manifest["stages"]["cluster"]
    diagnostics = run.read_json("cluster", "diagnostics")
    typer.echo(f"clustered {facts['half_neurons']} half-neurons into {facts['clusters']} clusters in "
               f"{facts['seconds']:.1f}s; eigengap suggests k={diagnostics['suggested_k']}, "
               f"silhouette {_maybe(diagnostics['silhouette'])}, "
               f"intra/inter similarity {_maybe(diagnostics['intra_inter_ratio'])}")


def _maybe(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


@app.command()
@friendly
def describe(
    run_dir: Annotated[str, typer.Argument(help="a clustered run directory")],
    explainer: Annotated[str, typer.Option(help="stats (offline, no LLM) or KIND:MODEL[@URL]: openai:..., "
                                           "anthropic:..., local:...")] = "stats",
    simulator: Annotated[str, typer.Option(help="backend that scores descriptions (embed:minilm is an offline "
                                           "sentence-embedding simulator)")] = "embed:minilm",
    samples: Annotated[int, typer.Option(help="candidate descriptions per explanation")] = 5,
    highlight: Annotated[str, typer.Option(help="quantile (quantile walk) or topk")] = "quantile",
    highlight_k: Annotated[int, typer.Option(help="distinct highlighted strings (quantile) or tokens (topk)")] = 3,
    concurrency: Annotated[int, typer.Option(help="clusters described at once")] = 4,
    clusters: Annotated[str | None, typer.Option(help="comma-separated cluster ids (default: all)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="count calls and tokens; send nothing")] = False,
) -> None:
    """Describe each cluster (what makes it fire, what it makes the model say), score and label it."""
    from pydantic import ValidationError

    from adag.describe import DescribeConfig, describe_run

    try:
        chosen = [int(c) for c in clusters.split(",")] if clusters else None
        config = DescribeConfig(explainer=explainer, simulator=simulator, samples=samples, highlight=highlight,
                                highlight_k=highlight_k, concurrency=concurrency, clusters=chosen)
    except ValidationError as error:
        first = error.errors()[0]
        option = "--" + str(first["loc"][0]).replace("_", "-")
        raise AdagError(f"{option}: {first['msg'].removeprefix('Value error, ')}") from None
    except ValueError:
        raise AdagError("bad describe options; see `adag describe --help`") from None
    result = describe_run(run_dir, config, dry_run=dry_run)
    if dry_run:
        typer.echo(f"dry run: {result['clusters']} clusters would take about {result['calls']} LLM calls and "
                   f"{result['estimated_tokens']} tokens (explainer {explainer}, simulator {simulator}); "
                   "cached calls cost nothing")
        return
    table = _describe_summary(run_dir)
    typer.echo(table)
    typer.echo(f"described {result['clusters']} clusters ({result['failed']} failed) -> {run_dir}/describe")


def _describe_summary(run_dir: str) -> str:
    from adag.store import RunDir

    table = RunDir.open(run_dir).read_table("describe", "descriptions")
    lines = []
    for row in table.sort_values("cluster").itertuples():
        if row.status != "ok":
            lines.append(f"  cluster {row.cluster:3d}  FAILED: {row.failure}")
            continue
        lines.append(f"  cluster {row.cluster:3d}  {row.label!s:28s} input r={_maybe(row.input_score)} "
                     f"output r={_maybe(row.output_score)}  | {row.input_description}")
    return "\n".join(lines)


def _numbers(text: str, cast=float) -> list:
    try:
        return [cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise AdagError(f"expected a comma-separated list of numbers, got '{text}'") from None


@app.command()
@friendly
def steer(
    run_dir: Annotated[str, typer.Argument(help="a clustered run directory")],
    clusters: Annotated[str | None, typer.Option(help="comma-separated clusters (default: sweep all)")] = None,
    multipliers: Annotated[str, typer.Option(help="comma-separated multipliers (0 ablates)")] = "0,1,2",
    positions: Annotated[str, typer.Option(help="all, or traced (only where members were traced)")] = "all",
    controls: Annotated[int, typer.Option(help="random same-size same-layer sets per cluster")] = 0,
    model: Annotated[str | None, typer.Option(help="model spec if not the run's own")] = None,
) -> None:
    """Scale clusters' half-neurons and measure the answer: probabilities, logit changes, KL, top tokens."""
    from adag.steer import SteerConfig, steer_run
    from adag.steer.run import run_model
    from adag.store import RunDir

    config = SteerConfig(clusters=_numbers(clusters, int) if clusters else None,
                         multipliers=_numbers(multipliers), positions=positions, controls=controls)
    run = steer_run(run_dir, config, lm=run_model(RunDir.open(run_dir), model))
    summary = run.read_table("steer", "summary")
    typer.echo(summary.round(4).to_string(index=False))
    if controls:
        typer.echo(run.read_table("steer", "controls").round(4).to_string(index=False))
    typer.echo(f"plots in {run.path / 'steer' / 'plots'}")


@app.command()
@friendly
def correlate(
    run_dir: Annotated[str, typer.Argument(help="a clustered run directory")],
    metric: Annotated[str, typer.Option(help="a numeric metadata field of the dataset rows")],
) -> None:
    """Correlate each cluster's per-prompt attribution with a per-prompt metric (Pearson, Spearman)."""
    import pandas as pd

    from adag.steer import correlate as correlate_clusters
    from adag.store import RunDir

    run = RunDir.open(run_dir)
    run.require_stage("cluster", "adag cluster")
    prompts = run.read_table("trace", "prompts")
    values = prompts["metadata"].map(lambda m: json.loads(m).get(metric))
    if values.isna().all():
        raise AdagError(f"no prompt has metadata field '{metric}'")
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.isna().any():
        raise AdagError(f"metadata field '{metric}' is missing or not a number on some prompts")
    table = correlate_clusters(run.read_table("cluster", "prompt_clusters"),
                               pd.Series(numbers.to_numpy(), index=prompts["prompt"]))
    run.write_table("steer", f"correlation_{metric}", table)
    typer.echo(table.round(4).to_string(index=False))


@app.command()
@friendly
def faithfulness(
    run_dir: Annotated[str, typer.Argument(help="a traced run directory")],
    fractions: Annotated[str, typer.Option(help="fractions of traced nodes kept")] = "0.01,0.05,0.1,0.2,0.5,1",
    ablation: Annotated[str, typer.Option(help="zero or mean")] = "zero",
) -> None:
    """Faithfulness and completeness of node circuits (top nodes kept, the rest ablated)."""
    from adag.steer import faithfulness_run

    if ablation not in ("zero", "mean"):
        raise AdagError("--ablation takes zero or mean")
    typer.echo(faithfulness_run(run_dir, _numbers(fractions), ablation).round(4).to_string(index=False))


@app.command()
@friendly
def judge(
    run_dir: Annotated[str, typer.Argument(help="a clustered run directory")],
    cluster: Annotated[int, typer.Option(help="cluster to steer")],
    question: Annotated[str, typer.Option(help="yes/no question the judge answers about each generation")],
    judge_backend: Annotated[str, typer.Option("--judge", help="KIND:MODEL[@URL] of the judge")]
    = "local:smollm2-135m",
    multipliers: Annotated[str, typer.Option(help="comma-separated multipliers")] = "0,1,2",
    samples: Annotated[int, typer.Option(help="generations per prompt and setting")] = 4,
    max_new_tokens: Annotated[int, typer.Option(help="length of each generation")] = 40,
    coherence: Annotated[bool, typer.Option(help="also ask whether each generation is coherent")] = False,
) -> None:
    """Generate under steering and have a judge LLM answer a yes/no question; rate = yes / (yes + no)."""
    import pandas as pd

    from adag.describe.llm import CachedBackend, make_backend
    from adag.models.loading import cache_dir
    from adag.steer import scaled
    from adag.steer.judge import generate, judge_rate
    from adag.steer.run import cluster_members, run_model
    from adag.store import RunDir

    run = RunDir.open(run_dir)
    run.require_stage("cluster", "adag cluster")
    lm = run_model(run)
    members = cluster_members(run)
    if cluster not in members:
        raise AdagError(f"no cluster {cluster} in {run_dir}")
    judge_llm = CachedBackend(make_backend(judge_backend), cache_dir() / "llm-cache.sqlite")
    prompts = run.read_table("trace", "prompts")
    questions = [question] + (["Is this text coherent?"] if coherence else [])
    rows = []
    for multiplier in _numbers(multipliers):
        texts = [t for _, t in generate(lm, prompts, samples, max_new_tokens, 0,
                                        scaled(lm.model, lm.adapter, members[cluster], multiplier))]
        for asked in questions:
            rows.append({"cluster": cluster, "multiplier": multiplier, "question": asked,
                         **judge_rate(judge_llm, asked, texts)})
    table = pd.DataFrame(rows)
    run.write_table("steer", f"judged_cluster{cluster}", table)
    typer.echo(table.round(3).to_string(index=False))


@app.command()
@friendly
def serve(
    run_dir: Annotated[str, typer.Argument(help="a clustered run directory")],
    host: Annotated[str, typer.Option(help="address to bind (127.0.0.1 keeps it on this machine)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
) -> None:
    """Browse a run: cluster graph, cluster panels, per-prompt neuron graphs."""
    from adag.report import make_server

    try:
        server = make_server(run_dir, host, port)
    except OSError as error:
        raise AdagError(f"cannot listen on {host}:{port} ({error.strerror}); try another --port") from None
    typer.echo(f"serving {run_dir} at http://{host}:{server.server_port}/  (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.server_close()


@app.command()
@friendly
def report(
    run_dir: Annotated[str, typer.Argument(help="a clustered run directory")],
    out: Annotated[str | None, typer.Option(help="output file (default RUN_DIR/report.html)")] = None,
) -> None:
    """Write the viewer with all its data as one self-contained HTML file."""
    from adag.report import write_report

    typer.echo(f"report written to {write_report(run_dir, out)}")


@app.command()
@friendly
def export(
    run_dir: Annotated[str, typer.Argument(help="a traced run directory")],
    prompt: Annotated[int, typer.Option(help="prompt id")],
    out: Annotated[str, typer.Option(help="output .json file")],
) -> None:
    """Export one prompt's graph as Neuronpedia / circuit-tracer graph JSON (cluster labels as supernodes)."""
    from adag.report import write_neuronpedia

    typer.echo(f"graph written to {write_neuronpedia(run_dir, prompt, out)}")
