"""Question D of RESULTS.md (plan of 2026-12-06): last-epoch kNN of the new runs against 2026-12-02's,
means with 95 % t-intervals over 3 seeds; a change only where the intervals do not overlap.
Usage: python change_vs_2026-12-02.py OLD/curves.csv NEW/curves.csv"""
import csv, statistics, sys
T = 4.303
def last(path):
    rows = list(csv.DictReader(open(path)))
    out = {}
    rows = [r for r in rows if r["seed"].isdigit()]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        per_seed = {}
        for r in rows:
            if r["arm"] == arm:
                s = r["seed"]
                if s not in per_seed or int(r["epoch"]) > per_seed[s][0]:
                    per_seed[s] = (int(r["epoch"]), float(r["knn_top1"]))
        out[arm] = [per_seed[s][1] for s in sorted(per_seed)]
    return out
def ci(v):
    m = statistics.mean(v); h = T * statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else float("nan")
    return m, m - h, m + h
old, new = last(sys.argv[1]), last(sys.argv[2])
print("| arm | 2026-12-02 (ours) | 2026-12-06 (authors') | difference | intervals |")
print("|---|---|---|---|---|")
for arm in new:
    o, n = ci(old[arm]), ci(new[arm])
    overlap = not (o[2] < n[1] or n[2] < o[1])
    print(f"| {arm} | {o[0]:.1f} [{o[1]:.1f}, {o[2]:.1f}] | {n[0]:.1f} [{n[1]:.1f}, {n[2]:.1f}] "
          f"({len(new[arm])} seeds) | {n[0]-o[0]:+.1f} | {'overlap: no change' if overlap else 'do not overlap: a change'} |")
