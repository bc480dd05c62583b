"""How well does an explainer recover planted rules? Prints one table per explainer, and optionally a
comparison of highlight settings (quantile walk with k = 1, 2, 3 against top-k).

    python benchmarks/describe_eval.py --explainer stats
    python benchmarks/describe_eval.py --explainer local:smollm2-135m
    python benchmarks/describe_eval.py --explainer stats --explainer local:qwen2.5-coder-1.5b \
        --simulator embed:minilm --simulator local:qwen2.5-coder-1.5b --samples 1   # explainers x simulators
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


def run(config: DescribeConfig, tokenizer, cache: Path, rules) -> list[CaseResult]:
    explainer, simulator = make_llms(config, DescribeOptions(), cache)
    return [evaluate_rule(rule, tokenizer, explainer, simulator, config) for rule in rules]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--explainer", action="append", help="explainer spec (repeatable; default stats)")
    parser.add_argument("--simulator", action="append",
                        help="simulator spec (repeatable; default embed:minilm): every explainer is scored with each")
    parser.add_argument("--rules", type=int, help="only the first N planted rules (a reduced run)")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--highlights", action="store_true", help="also compare highlight settings")
    parser.add_argument("--fake-server", action="store_true",
                        help="explain and simulate through the fake OpenAI server's reading model (plumbing)")
    parser.add_argument("--cache", type=Path, help="SQLite cache of replies (default: a fresh temporary one)")
    args = parser.parse_args()

    tokenizer = load_model("smollm2-135m").tokenizer
    with ExitStack() as stack:
        cache = args.cache or Path(stack.enter_context(tempfile.TemporaryDirectory())) / "cache.sqlite"
        explainers, simulators = args.explainer or ["stats"], args.simulator or ["embed:minilm"]
        rules = RULES[:args.rules]
        if args.fake_server:
            from tests.fake_openai import FakeOpenAI, reading_model

            server = stack.enter_context(FakeOpenAI(respond=reading_model))
            spec = f"openai:reading-model@{server.url}"
            explainers, simulators = [spec], [spec]
        for spec, simulator in ((e, s) for e in explainers for s in simulators):
            config = DescribeConfig(explainer=spec, simulator=simulator, samples=args.samples)
            started = time.perf_counter()
            results = run(config, tokenizer, cache, rules)
            print(table(f"\nexplainer {spec}, simulator {simulator}, {len(rules)} {PLANTED} "
                        f"({time.perf_counter() - started:.0f} s)", results), flush=True)
            if not args.highlights or simulator != simulators[0]:
                continue
            print(f"\nhighlight settings (input rules), explainer {spec}:")
            for highlight, k in HIGHLIGHTS:
                chosen = config.model_copy(update={"highlight": highlight, "highlight_k": k})
                results = run(chosen, tokenizer, cache, [r for r in rules if r.kind == "input"])
                print(f"  {highlight:8s} k={k}  recovered {sum(r.recovered for r in results)}/{len(results)}  "
                      f"mean score {mean([r.score for r in results])}  "
                      + "  ".join(f"{r.rule}={fmt(r.score)}" for r in results), flush=True)


if __name__ == "__main__":
    main()
