"""
Accuracy against test-time iterations, one line per difficulty, from the eval.json that train.py writes.

    python plot.py out/eval.json --out figs/prefix_sums.png
    python plot.py out_std/eval.json out_int/eval.json --out figs/sudoku.png    # several runs: one line style each

Needs matplotlib (optional for the rest of the project): pip install matplotlib.
"""

import argparse
import json
import os

from train import OneLineParser

STYLES = ('-', '--', ':', '-.')


def read_eval(path):
    """An eval.json as a dict, or a one-line SystemExit."""
    try:
        with open(path) as f:
            run = json.load(f)
    except OSError as err:
        raise SystemExit(f"plot.py: error: cannot read {path}: {err.strerror}")
    except ValueError:
        run = None
    rows = run.get('rows') if isinstance(run, dict) else None
    if not rows or not all(isinstance(row, dict) and 'curve' in row for row in rows):
        raise SystemExit(f"plot.py: error: {path} is not an eval.json with accuracy curves (written by train.py)")
    return run


def label(run):
    m = run['config']['model']
    return f"{m['recall']}, {'outer norm' if m['outer_norm'] else 'no outer norm'}"


def plot(runs, out, title=''):
    """runs: {label: eval.json dict}. Draws accuracy (%) against iterations (log scale), a colour per difficulty
    and a line style per run, a dot at each run's default rule, and saves it to `out`."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        raise SystemExit("plot.py: error: plotting needs matplotlib: pip install matplotlib")
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for style, run in zip(STYLES * len(runs), runs.values()):
        head = run['headline']
        for color, row in enumerate(run['rows']):
            iters = sorted(int(t) for t in row['curve'])
            ax.plot(iters, [100 * row['curve'][str(t)] for t in iters], style, color=f'C{color % 10}')
            rule = row.get('halt', {}).get('mean_iters', row['rule_iters'])   # the default rule: halting if any
            acc = row['halt']['scores'][head] if 'halt' in row else row['curve'].get(str(row['rule_iters']))
            if acc is not None:
                ax.plot(rule, 100 * acc, 'o', color=f'C{color % 10}', ms=4)
    first = next(iter(runs.values()))
    handles = [plt.Line2D([], [], color=f'C{i % 10}', label=str(row['difficulty']))
               for i, row in enumerate(first['rows'])]
    if len(runs) > 1:
        handles += [plt.Line2D([], [], ls=style, color='k', label=name) for style, name in zip(STYLES, runs)]
    ax.legend(handles=handles, fontsize=7, loc='center left', bbox_to_anchor=(1.01, 0.5))
    ax.set(xscale='log', xlabel='test-time iterations (dots: the default rule, at its mean iterations)',
           ylabel=f"{first['headline']} accuracy (%)", ylim=(-3, 103), title=title)
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=2))           # 1, 2, 4, 8 ... iterations
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    print(f"wrote {out}")


def main(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('eval_json', nargs='+', help='eval.json files written by train.py')
    p.add_argument('--out', default='accuracy.png', help='the PNG to write [accuracy.png]')
    p.add_argument('--title', default='', help='a title for the figure')
    args = p.parse_args(argv)
    runs = {}
    for path in args.eval_json:
        run = read_eval(path)
        runs[label(run) if label(run) not in runs else path] = run
    try:
        plot(runs, args.out, args.title)
    except OSError as err:
        raise SystemExit(f"plot.py: error: cannot write {args.out}: {err.strerror}")


if __name__ == '__main__':
    main()
