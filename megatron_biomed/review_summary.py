"""Reading clinicians' ratings back: `tools/review_sheet.py summarize --key review_key.csv ratings*.csv`.

Unblinds each rating through the key file the sheet was made with, merges several reviewers,
and reports per model: the mean rating with a 95% bootstrap interval (questions resampled, so
an answer's several ratings stay together), the harm rate among answers assessed for harm, the
pairwise win rate (the same question and reviewer; a tie counts half) and the inter-rater
agreement (Krippendorff's alpha, ordinal). A table on stdout, a JSON file and a PNG chart.

A ratings file is what the sheet's download button writes (reviewer, id, label, rating_1_to_5,
harm, comment) or the sheet's CSV filled in a spreadsheet (no reviewer column: the file's name
stands for the reviewer).
"""
import csv
import itertools
import json
import os

import numpy as np

from megatron_biomed.errors import UserError
from megatron_biomed.review_sheet import HARM
from megatron_biomed.utils import atomic_output


class RatingsError(UserError, ValueError):
    pass


def _read_csv(path, required):
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            rows = list(reader)
    except FileNotFoundError:
        raise RatingsError(f"{path}: no such file") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise RatingsError(f"{path}: not a CSV file ({e}); give the file the review sheet downloaded") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise RatingsError(f"{path}: no column {', '.join(missing)} (it has {', '.join(header) or 'none'}); give the "
                           f"key file tools/review_sheet.py wrote, and rating files the sheet downloaded")
    return rows


def read_key(path):
    """{(id, label): model}"""
    key = {}
    for line, row in enumerate(_read_csv(path, ("id", "label", "model")), 2):
        key[(row["id"], row["label"])] = row["model"]
    if not key:
        raise RatingsError(f"{path}: no rows")
    return key


def read_ratings(path, key, key_path):
    """[(reviewer, id, model, rating or None, harm)] of one file, checked against the key."""
    out, seen = [], {}
    for line, row in enumerate(_read_csv(path, ("id", "label", "rating_1_to_5")), 2):
        where = f"{path}:{line}"
        reviewer = (row.get("reviewer") or "").strip() or os.path.splitext(os.path.basename(path))[0]
        ident = (row["id"], row["label"])
        if ident not in key:
            raise RatingsError(f"{where}: question {row['id']!r} answer {row['label']!r} is not in {key_path}; "
                               f"the ratings belong to another sheet (give the key file made with it)")
        if (reviewer, ident) in seen:
            raise RatingsError(f"{where}: {reviewer} rated question {row['id']!r} answer {row['label']!r} twice "
                               f"(first on line {seen[(reviewer, ident)]})")
        seen[(reviewer, ident)] = line
        text = (row["rating_1_to_5"] or "").strip()
        if text and text not in ("1", "2", "3", "4", "5"):
            raise RatingsError(f"{where}: rating {text!r}; a rating is 1 to 5, or empty when not rated")
        harm = (row.get("harm") or "").strip().lower() or HARM[0]
        if harm not in HARM:
            raise RatingsError(f"{where}: harm {harm!r}; it is one of: {', '.join(HARM)}")
        out.append((reviewer, row["id"], key[ident], int(text) if text else None, harm))
    if not out:
        raise RatingsError(f"{path}: no ratings")
    return out


def _bootstrap_mean(per_question, seed):
    """95% interval of the mean rating, resampling questions (each question's ratings together)."""
    from scipy.stats import bootstrap
    totals = np.array([sum(v) for v in per_question.values()], dtype=float)
    counts = np.array([len(v) for v in per_question.values()], dtype=float)
    if len(totals) < 2:
        return None, None
    res = bootstrap((totals, counts), lambda t, c, axis=-1: t.sum(axis=axis) / c.sum(axis=axis), paired=True,
                    vectorized=True, n_resamples=2000, confidence_level=0.95, method="percentile",
                    random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def summarize(ratings, seed=0):
    models = sorted({m for _, _, m, _, _ in ratings})
    reviewers = sorted({r for r, _, _, _, _ in ratings})
    per_model = {}
    for model in models:
        mine = [x for x in ratings if x[2] == model]
        rated = [x for x in mine if x[3] is not None]
        per_question = {}
        for _, qid, _, rating, _ in rated:
            per_question.setdefault(qid, []).append(rating)
        assessed = [x for x in mine if x[4] != "not assessed"]
        low, high = _bootstrap_mean(per_question, seed)
        per_model[model] = {
            "ratings": len(rated), "questions": len(per_question),
            "mean_rating": float(np.mean([x[3] for x in rated])) if rated else None,
            "ci95": [low, high] if low is not None else None,
            "harm_rate": sum(x[4] == "yes" for x in assessed) / len(assessed) if assessed else None,
            "harm_assessed": len(assessed), "harm_not_assessed": len(mine) - len(assessed)}
    by = {(r, q, m): rating for r, q, m, rating, _ in ratings if rating is not None}
    pairs = {}
    for a, b in itertools.combinations(models, 2):
        wins = ties = n = 0
        for (r, q, m), ra in by.items():
            if m != a or (r, q, b) not in by:
                continue
            rb = by[(r, q, b)]
            n += 1
            wins += ra > rb
            ties += ra == rb
        pairs[f"{a} vs {b}"] = {"compared": n, "win_rate": (wins + 0.5 * ties) / n if n else None,
                                "wins": wins, "ties": ties, "losses": n - wins - ties}
    agreement = None
    units = sorted({(q, m) for _, q, m in by})
    if len(reviewers) > 1 and units:
        import krippendorff
        data = np.array([[by.get((r, q, m), np.nan) for q, m in units] for r in reviewers], dtype=float)
        if np.sum(~np.isnan(data).all(axis=0) & (np.sum(~np.isnan(data), axis=0) > 1)) > 0:
            agreement = float(krippendorff.alpha(reliability_data=data, level_of_measurement="ordinal"))
    return {"models": per_model, "pairwise": pairs, "reviewers": reviewers,
            "krippendorff_alpha_ordinal": agreement}


def table(summary):
    lines = [f"{len(summary['reviewers'])} reviewer(s): {', '.join(summary['reviewers'])}",
             f"{'model':<20} {'ratings':>7} {'mean':>5}  {'95% CI':<13} {'harm rate':>9} {'assessed':>8}"]
    for model, s in summary["models"].items():
        ci = f"{s['ci95'][0]:.2f}-{s['ci95'][1]:.2f}" if s["ci95"] else "n/a"
        mean = f"{s['mean_rating']:.2f}" if s["mean_rating"] is not None else "n/a"
        harm = f"{s['harm_rate']:.1%}" if s["harm_rate"] is not None else "n/a"
        lines.append(f"{model:<20} {s['ratings']:>7} {mean:>5}  {ci:<13} {harm:>9} {s['harm_assessed']:>8}")
    for pair, p in summary["pairwise"].items():
        rate = f"{p['win_rate']:.1%}" if p["win_rate"] is not None else "n/a"
        lines.append(f"win rate {pair}: {rate} ({p['wins']} wins, {p['ties']} ties, {p['losses']} losses)")
    alpha = summary["krippendorff_alpha_ordinal"]
    lines.append("agreement (Krippendorff's alpha, ordinal): " +
                 (f"{alpha:.3f}" if alpha is not None else "n/a (needs two reviewers rating the same answers)"))
    return "\n".join(lines)


def chart(summary, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = [m for m, s in summary["models"].items() if s["mean_rating"] is not None]
    means = [summary["models"][m]["mean_rating"] for m in models]
    err = [[0, 0] if not summary["models"][m]["ci95"] else
           [means[i] - summary["models"][m]["ci95"][0], summary["models"][m]["ci95"][1] - means[i]]
           for i, m in enumerate(models)]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax.bar(models, means, yerr=np.array(err).T if models else None, capsize=4, color="#4c72b0")
    ax.set_ylim(1, 5)
    ax.set_ylabel("mean rating (95% CI)")
    harm = [summary["models"][m]["harm_rate"] or 0 for m in models]
    bx.bar(models, harm, color="#c44e52")
    bx.set_ylabel("harm rate (of answers assessed)")
    bx.set_ylim(0, 1)
    fig.suptitle(f"{len(summary['reviewers'])} reviewer(s)")
    fig.tight_layout()
    with atomic_output(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def run(key_path, rating_paths, output, seed=0):
    key = read_key(key_path)
    ratings = [r for p in rating_paths for r in read_ratings(p, key, key_path)]
    summary = summarize(ratings, seed)
    with atomic_output(output + ".json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    chart(summary, output + ".png")
    print(table(summary))
    print(f"wrote {output}.json and {output}.png")
    return summary
