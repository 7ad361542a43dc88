"""Draw the architecture figure: python scripts/make_architecture_figure.py [--out figures/architecture.png]

Boxes and arrows in matplotlib (no hand drawing, so the figure follows the code when it is
regenerated): stage 1 (reader SFT) on top; stage 2 below: retriever -> index (top-M pool) ->
scores and story choice -> fusion-in-decoder reader -> reward, then the two stage-2 objectives:
LAPDOG's gold-score loss for the retriever, or GRPO updates of the reader and the retriever
(group advantages, clipped surrogate, KL to frozen references). Green marks what the recipes in
configs/ run on top of the paper's recipe (the quickstart's): posterior stories with fact swaps
in stage 1, the copy head, the reader's evidence as the retriever's signal, the posterior step.
"""

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One colour per role, used by boxes and by the update arrows that reach them.
DATA, RETRIEVER, READER, REWARD, LAPDOG, GRPO, FROZEN = (
    "#eeeeee", "#fde2c4", "#d9e4f5", "#e2f0d9", "#f6d5e5", "#fff2b3", "#e6e6e6")
RETRIEVER_EDGE, READER_EDGE, OURS = "#c05a00", "#2b5797", "#1a7f37"


def box(ax, x, y, w, h, title, body="", face=DATA, edge="#444444", dashed=False, title_size=11.5, ours=""):
    """A rounded box with a bold title line, smaller body lines and, in green under them, what the
    recipes in configs/ add (``ours``); (x, y) is the lower left."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.25,rounding_size=0.8",
                                facecolor=face, edgecolor=edge, linewidth=1.4,
                                linestyle=(0, (4, 3)) if dashed else "-"))
    if body:
        ax.text(x + w / 2, y + h - 1.1, title, ha="center", va="top", fontsize=title_size, weight="bold")
        body_text = ax.text(x + w / 2, y + h - 3.6, body, ha="center", va="top", fontsize=9.2, linespacing=1.35)
        if ours:
            lines = body.count("\n") + 1
            ax.text(x + w / 2, y + h - 3.9 - 2.55 * lines, ours, ha="center", va="top", fontsize=9.0,
                    linespacing=1.35, color=OURS, style="italic")
        del body_text
    else:
        ax.text(x + w / 2, y + h / 2, title, ha="center", va="center", fontsize=title_size, weight="bold")
    return (x, y, w, h)


def anchor(b, side):
    x, y, w, h = b
    return {"left": (x - 0.3, y + h / 2), "right": (x + w + 0.3, y + h / 2),
            "top": (x + w / 2, y + h + 0.3), "bottom": (x + w / 2, y - 0.3)}[side]


def arrow(ax, start, end, colour="#222222", dashed=False, rad=0.0, label=None, label_at=0.5,
          label_offset=(0, 1.0), width=1.6):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, color=colour,
                                 linewidth=width, linestyle=(0, (5, 3)) if dashed else "-",
                                 connectionstyle=f"arc3,rad={rad}", shrinkA=0, shrinkB=0))
    if label:
        lx = start[0] + (end[0] - start[0]) * label_at + label_offset[0]
        ly = start[1] + (end[1] - start[1]) * label_at + label_offset[1]
        ax.text(lx, ly, label, ha="center", va="bottom", fontsize=8.8, color=colour, style="italic")


def panel(ax, x, y, w, h, title):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.3,rounding_size=1.2",
                                facecolor="white", edgecolor="#888888", linewidth=1.0))
    ax.text(x + 1.0, y + h - 0.6, title, ha="left", va="top", fontsize=12.5, weight="bold", color="#333333")


def draw(out):
    fig = plt.figure(figsize=(17, 11.6))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 170)
    ax.set_ylim(-12, 104)
    ax.axis("off")
    ax.text(85, 102, "LAPDOG-GRPO: retrieval-augmented persona dialogue, trained in two stages",
            ha="center", va="top", fontsize=15, weight="bold")

    # ---- stage 1 ---------------------------------------------------------------------------
    panel(ax, 2, 77, 166, 21, "Stage 1 — reader SFT  (the paper: closed book, --closed_book)")
    q1 = box(ax, 5, 79.5, 27, 12, "dialogue example",
             "persona: i like dogs. ... context: Q: ... R:\ngold reply (answers)")
    p1 = box(ax, 37, 79.5, 31, 12, "posterior story", "", face="white", edge=OURS, dashed=True)
    ax.texts[-1].set_position((52.5, 89.3))
    ax.text(52.5, 87.2, "the story sharing the most idf-weighted\nwords with the gold reply; its fact word\n"
            "swapped for a rare one in 90% (no labels)", ha="center", va="top", fontsize=8.8, color=OURS,
            style="italic", linespacing=1.3)
    r1 = box(ax, 73, 79.5, 32, 12, "T5 reader", "encoder(query [+ story]) → decoder\nteacher-forced on the gold reply",
             face=READER, edge=READER_EDGE, ours="+ copy head (src/model/pointer.py)")
    l1 = box(ax, 110, 79.5, 24, 12, "cross-entropy", "token NLL of the gold reply\nAdamW, linear schedule")
    c1 = box(ax, 139, 79.5, 26, 12, "stage-1 checkpoint", "starts stage 2 (--model_path)\nand is the frozen\nreference reader",
             face=FROZEN)
    arrow(ax, anchor(q1, "right"), anchor(p1, "left"), colour=OURS, dashed=True)
    arrow(ax, anchor(p1, "right"), anchor(r1, "left"), colour=OURS, dashed=True)
    arrow(ax, (anchor(q1, "right")[0], 90.5), (anchor(r1, "left")[0], 90.5), rad=-0.12)
    arrow(ax, anchor(r1, "right"), anchor(l1, "left"))
    arrow(ax, anchor(l1, "right"), anchor(c1, "left"))

    # ---- stage 2: the forward path ----------------------------------------------------------
    panel(ax, 2, -11, 166, 86, "Stage 2 — retrieval + reader, trained jointly  (LAPDOG or GRPO)")
    y = 53
    q = box(ax, 5, y, 23, 15, "dialogue example", "retrieval query: the persona\n(--retriever_from persona)\n"
            "reader query: persona +\ncontext, paired with each story")
    ret = box(ax, 33, y, 25, 15, "retriever", "Contriever-style BERT\nmean pooling → q\n(trained in stage 2)",
              face=RETRIEVER, edge=RETRIEVER_EDGE)
    idx = box(ax, 64, y, 25, 15, "story index", "flat / FAISS over ROCStories\nprecomputed p, no grad\n→ top-M pool")
    sel = box(ax, 95, y, 26, 15, "score and choose",
              "pool re-encoded with grad\ns = q·p / √H\nLAPDOG: top-n    GRPO: sample k\n(with replacement) from softmax(s / τ)",
              face=RETRIEVER, edge=RETRIEVER_EDGE)
    rd = box(ax, 127, y, 38, 15, "fusion-in-decoder T5 reader",
             "encode each (query + story) once\nthe decoder attends to all of them (fused)\n"
             "GRPO: G replies sampled per prompt\nfrom the cached encoder states",
             face=READER, edge=READER_EDGE)
    arrow(ax, anchor(q, "right"), anchor(ret, "left"))
    arrow(ax, anchor(ret, "right"), anchor(idx, "left"), label="q", label_offset=(0, 0.5))
    arrow(ax, anchor(idx, "right"), anchor(sel, "left"), label="top-M", label_offset=(0, 0.5))
    arrow(ax, anchor(sel, "right"), anchor(rd, "left"), label="stories", label_offset=(0, 0.5))

    rw = box(ax, 127, 30, 38, 14.5, "reward of each reply",
             "r = (a·BLEU + b·F1 + c·ROUGE-L) × LP\nLP = exp(−s·|1 − h/r|)  (2s when shorter)\n"
             "against the gold reply  (src/objectives/rewards.py)", face=REWARD)
    arrow(ax, anchor(rd, "bottom"), anchor(rw, "top"), label="replies", label_offset=(3.4, -0.9))

    # ---- stage 2: the two objectives --------------------------------------------------------
    box(ax, 5, -4, 52, 48.5, "LAPDOG  (--train_retriever)",
              "gold score of story k  (f1rougebleudist):\n"
              "g_k = a·BLEU/‖BLEU‖ + b·F1 + c·ROUGE-L\n"
              "of a greedy reply from query + story k\n\n"
              "retriever loss:\n"
              "KL( softmax(g / τ_g) ‖ softmax(s / τ_s) )\n"
              "paper: τ_g = 0.85, τ_s = 0.8\n\n"
              "reader loss: cross-entropy on the fused top-n\n"
              "stories, as in stage 1  (--fix_reader: none)\n"
              "candidate augmentation: --add_random_retrieval",
              face=LAPDOG, edge="#a0306a", title_size=12,
              ours=("configs/lapdog_evidence.yaml: the gold score is the\nreader's evidence, "
                    "log p(target's fact words | q, story k),\nfitted by EMDR over whole replies (emdr_seq, τ_g 3):\n"
                    "the posterior step below; pools of 32, query side only"))
    grpo = box(ax, 63, -4, 58, 48.5, "GRPO  (--reader_rl_learning --use_grpo)",
               "group advantages  A = (r − mean) / (std + 1e-4)\n"
               "reader: within the G replies of a prompt\n"
               "retriever (--grpo_train_retriever): J = E_j~π[R(j)];\n"
               "pool: R(j) = reward of the greedy reply, every story,\n"
               "A_j = R(j) − Σ π_old R, surrogate in expectation over π_old\n"
               "clipped surrogate, per token / per story:\n"
               "−min( ρ·A, clip(ρ, 1−ε, 1+ε)·A ) + β·KL\n"
               "ρ = π_θ / π_old  (≠ 1 only when samples are reused, μ > 1)",
               face=GRPO, edge="#9a7b00", title_size=12,
               ours="configs/joint_grpo_evidence.yaml: R(j) = the reader's evidence\nfor the target's facts; posterior step: fit "
                    "π_old·exp(A/β)\nby cross-entropy (β 3), pools of 32, k = 1 drawn story")
    box(ax, 67, -2, 50, 9.5, "KL to frozen references",
        "stage-1 reader: k3 per token;  retriever at stage-2 start:\nexact categorical KL over the pool;  no grad",
        face=FROZEN, dashed=True, title_size=10.5)
    arrow(ax, anchor(rw, "left"), anchor(grpo, "right")[0:1] + (37.25,), label="r", label_offset=(0, 0.4))
    # gold scores reach LAPDOG along the bottom edge, so no line crosses the GRPO box
    corner = (130, -7.5)
    ax.plot([corner[0], corner[0], 31], [29.7, corner[1], corner[1]], color="#a0306a", linewidth=1.6)
    arrow(ax, (31, corner[1]), (31, -4.3), colour="#a0306a")
    ax.text(92, corner[1] + 0.5, "LAPDOG: the same metrics of one greedy reply per story → gold scores g_k",
            ha="center", va="bottom", fontsize=8.8, color="#a0306a", style="italic")

    # update arrows: dashed, in the colour of the model they change
    arrow(ax, (30, 44.8), (42, 52.7), colour=RETRIEVER_EDGE, dashed=True, width=2.0)
    arrow(ax, (98, 44.8), (106, 52.7), colour=RETRIEVER_EDGE, dashed=True, width=2.0)
    arrow(ax, (114, 44.8), (134, 52.7), colour=READER_EDGE, dashed=True, width=2.0, rad=-0.15)
    box(ax, 133, 3, 33, 22, "key", "")
    ax.texts[-1].set_position((149.5, 23))  # the key's title sits at its top
    for i, (colour, dashed, text) in enumerate(((("#222222", False, "data flow")),
                                                (RETRIEVER_EDGE, True, "retriever update"),
                                                (READER_EDGE, True, "reader update"),
                                                (OURS, True, "what configs/ add\n(the quickstart's recipe)"))):
        yy = 19.5 - 4 * i
        ax.plot([135, 143], [yy, yy], color=colour, linewidth=2, linestyle=(0, (5, 3)) if dashed else "-")
        ax.text(145, yy, text, fontsize=10, va="center", color=colour)

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "figures", "architecture.png"))
    args = parser.parse_args(argv)
    print(f"wrote {draw(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
