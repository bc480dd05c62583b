"""How well does an explainer recover planted rules? Prints one table per explainer, and optionally a
comparison of highlight settings (quantile walk with k = 1, 2, 3 against top-k).

    python benchmarks/describe_eval.py --explainer stats
    python benchmarks/describe_eval.py --explainer local:smollm2-135m
    python benchmarks/describe_eval.py --explainer stats --explainer local:qwen2.5-coder-1.5b \
        --simulator embed:minilm --simulator local:qwen2.5-coder-1.5b --samples 1   # explainers x simulators
    python benchmarks/describe_eval.py ... --rules 4 --top-records 8 --random-records 4 --out table.txt
        # reduced: 4 rules (input and output alternately), 6 held-out records each, the output saved
    python benchmarks/describe_eval.py --explainer stats --highlights
    python benchmarks/describe_eval.py --explainer openai:MODEL@http://127.0.0.1:8000/v1 --simulator openai:...
    python benchmarks/describe_eval.py --fake-server      # prompt plumbing, through tests/fake_openai.py

Cases and scoring: tests/planted_rules.py. Replies are cached in --cache (default: a fresh one).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adag.describe.config import DescribeConfig, DescribeOptions  # noqa: E402
from adag.describe.run import make_llms  # noqa: E402
from adag.models import load_model  # noqa: E402
from tests.planted_rules import MARGIN, RECOVERED_WITHIN, RULES, CaseResult, evaluate_rule  # noqa: E402

HIGHLIGHTS = [("quantile", 1), ("quantile", 2), ("quantile", 3), ("topk", 1), ("topk", 3)]
PLANTED = "planted rules; score, baselines (top1, top3), true, wrong and near-miss rules on the same held-out records"


def fmt(value: float | None) -> str:
    return "  n/a" if value is None else f"{value:+.2f}"


def mean(values: list[float | None]) -> str:
    kept = [v for v in values if v is not None]
    return fmt(sum(kept) / len(kept) if kept else None)


def table(title: str, results: list[CaseResult]) -> str:
    lines = [title, f"{'rule':26s} {'kind':6s} {'score':>6s} {'top1':>6s} {'top3':>6s} {'true':>6s} {'wrong':>6s} "
                    f"{'near':>6s} unseen rec  description", "-" * 120]
    for r in results:
        lines.append(f"{r.rule:26s} {r.kind:6s} {fmt(r.score):>6s} {fmt(r.top_token):>6s} {fmt(r.top3_tokens):>6s} "
                     f"{fmt(r.true_score):>6s} {fmt(r.wrong_score):>6s} {fmt(r.near_score):>6s} "
                     f"{'yes' if r.unseen else 'no ':6s} {'yes' if r.recovered else 'no ':3s}  {r.description[:70]}")
    lines.append(f"recovered {sum(r.recovered for r in results)}/{len(results)} (beats both baselines by {MARGIN} "
                 f"and within {RECOVERED_WITHIN} of the true rule); beats both baselines "
                 f"{sum(r.beats_baselines for r in results)}/{len(results)}; "
                 f"mean score {mean([r.score for r in results])}"
                 f", quote top token {mean([r.top_token for r in results])}, quote top 3 "
                 f"{mean([r.top3_tokens for r in results])}")
    lines.append(f"simulator on the true rules: mean {mean([r.true_score for r in results])}; true beats wrong "
                 f"{sum((r.true_score or -2) > (r.wrong_score or -2) for r in results)}/{len(results)}, true beats "
                 f"near miss {sum((r.true_score or -2) > (r.near_score or -2) for r in results)}/{len(results)}")
    return "\n".join(lines)


BASELINES = {"quote top token": "top_token", "quote top 3 tokens": "top3_tokens", "true rule": "true_score",
             "wrong rule": "wrong_score", "near-miss rule": "near_score"}


def grid(results: dict[tuple[str, str], list[CaseResult]], simulators: list[str]) -> str:
    """Mean score per explainer (and recovered count) and per baseline (scored with each simulator: the
    same descriptions for every explainer, so from the first explainer's run) x simulator."""
    explainers = list(dict.fromkeys(e for e, _ in results))
    width = max(22, *map(len, simulators))
    lines = [f"{'mean score (recovered)':34s}" + "".join(f"{s:>{width + 2}s}" for s in simulators)]
    for explainer in explainers:
        cells = [f"{mean([r.score for r in c])} ({sum(r.recovered for r in c)}/{len(c)})"
                 for c in (results[explainer, s] for s in simulators)]
        lines.append(f"{'explainer ' + explainer:34s}" + "".join(f"{cell:>{width + 2}s}" for cell in cells))
    for name, field in BASELINES.items():
        cells = [results[explainers[0], s] for s in simulators]
        lines.append(f"{'baseline ' + name:34s}" + "".join(
            f"{mean([getattr(r, field) for r in c]):>{width + 2}s}" for c in cells))
    return "\n".join(lines)


def reduced(count: int | None) -> list:
    """The first `count` planted rules taken alternately from the input and the output rules (all: None)."""
    if count is None:
        return list(RULES)
    kinds = [[r for r in RULES if r.kind == kind] for kind in ("input", "output")]
    alternating = [r for pair in zip(*kinds) for r in pair] + [r for k in kinds for r in k[min(map(len, kinds)):]]
    return alternating[:count]


def run(config: DescribeConfig, tokenizer, cache: Path, rules) -> list[CaseResult]:
    explainer, simulator = make_llms(config, DescribeOptions(), cache)
    return [evaluate_rule(rule, tokenizer, explainer, simulator, config) for rule in rules]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--explainer", action="append", help="explainer spec (repeatable; default stats)")
    parser.add_argument("--simulator", action="append",
                        help="simulator spec (repeatable; default embed:minilm): every explainer is scored with each")
    parser.add_argument("--rules", type=int,
                        help="only N planted rules, input and output rules alternately (a reduced run)")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--top-records", type=int, help="strongest records per pool (default: describe's)")
    parser.add_argument("--random-records", type=int, help="random other records per pool (default: describe's)")
    parser.add_argument("--out", type=Path, help="also write everything printed to this file")
    parser.add_argument("--highlights", action="store_true", help="also compare highlight settings")
    parser.add_argument("--fake-server", action="store_true",
                        help="explain and simulate through the fake OpenAI server's reading model (plumbing)")
    parser.add_argument("--cache", type=Path, help="SQLite cache of replies (default: a fresh temporary one)")
    args = parser.parse_args()

    tokenizer = load_model("smollm2-135m").tokenizer
    with ExitStack() as stack:
        cache = args.cache or Path(stack.enter_context(tempfile.TemporaryDirectory())) / "cache.sqlite"
        explainers, simulators = args.explainer or ["stats"], args.simulator or ["embed:minilm"]
        rules = reduced(args.rules)
        pools = {k: v for k, v in (("top_records", args.top_records), ("random_records", args.random_records)) if v}
        say = stack.enter_context(Printer(args.out))
        results = {}
        if args.fake_server:
            from tests.fake_openai import FakeOpenAI, reading_model

            server = stack.enter_context(FakeOpenAI(respond=reading_model))
            spec = f"openai:reading-model@{server.url}"
            explainers, simulators = [spec], [spec]
        for spec, simulator in ((e, s) for e in explainers for s in simulators):
            config = DescribeConfig(explainer=spec, simulator=simulator, samples=args.samples, **pools)
            started = time.perf_counter()
            results[spec, simulator] = run(config, tokenizer, cache, rules)
            say(table(f"\nexplainer {spec}, simulator {simulator}, {len(rules)} {PLANTED} "
                      f"({time.perf_counter() - started:.0f} s wall, {time.process_time():.0f} s CPU so far; "
                      f"pools of {config.top_records}+{config.random_records} records)", results[spec, simulator]))
            if not args.highlights or simulator != simulators[0]:
                continue
            say(f"\nhighlight settings (input rules), explainer {spec}:")
            for highlight, k in HIGHLIGHTS:
                chosen = config.model_copy(update={"highlight": highlight, "highlight_k": k})
                found = run(chosen, tokenizer, cache, [r for r in rules if r.kind == "input"])
                say(f"  {highlight:8s} k={k}  recovered {sum(r.recovered for r in found)}/{len(found)}  "
                    f"mean score {mean([r.score for r in found])}  "
                    + "  ".join(f"{r.rule}={fmt(r.score)}" for r in found))
        say(f"\nexplainers x simulators, {len(rules)} planted rules:\n" + grid(results, simulators))


class Printer:
    """Prints, and writes the same lines to a file when one is given (flushed, so a cut-off run keeps them)."""

    def __init__(self, path: Path | None):
        self.file = path.open("w") if path else None

    def __enter__(self) -> Printer:
        return self

    def __exit__(self, *exc) -> None:
        if self.file:
            self.file.close()

    def __call__(self, text: str) -> None:
        print(text, flush=True)
        if self.file:
            self.file.write(text + "\n")
            self.file.flush()


if __name__ == "__main__":
    main()
