"""Talk to a trained checkpoint: a persona, then turns, each reply printed with the story it read.

    python chat.py --model_path runs/quickstart-seed0/joint_grpo/checkpoint/latest \
        --persona "i have a dog. i like to read." [--show_stories 3] [--once "hi , do you have pets ?"]

The conversation is kept as turns in LAPDOG's format (src/data/prompts.py dialogue_question):
``persona: P context:  Q: ... R: ... Q: ...`` with Q the user and R the persona's owner, the newest
--context_turns utterances in the context, as in LAPDOG's ConvAI2 data. What the user types is
lowercased and its punctuation split off, as the data is. Replies are greedy (beam search with
--generation_num_beams) from the top --n_context retrieved stories; the checkpoint's options.json
supplies every option not given here, the story corpus --passages included. A closed-book
(stage-1) checkpoint without --passages answers closed book and says so. Interactive: /reset
forgets the turns, /quit (or the end of the input) ends.
"""

import os
import random
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from src.cli import options, preflight  # noqa: E402
from src.data.dialogues import load_passages  # noqa: E402
from src.data.prompts import dialogue_question, normalize_persona, normalize_utterance, persona_sentences  # noqa: E402
from src.evaluation.generation import decoding_options  # noqa: E402
from src.infra import distributed, exits, safety  # noqa: E402
from src.infra.errors import flag_error  # noqa: E402
from src.model.reader import FiDReader  # noqa: E402
from src.model.retriever import Retriever  # noqa: E402
from src.retrieval.stories import StoryRetrieval  # noqa: E402
from src.run import checkpoint  # noqa: E402
from src.run.batch import make_batch  # noqa: E402

PERSONA_FIX = 'give the persona\'s sentences, e.g. --persona "i have a dog. i like to read."'


def chat_options(argv):
    """Defaults <- the checkpoint's options.json <- this command line (as evaluate.py layers them)."""
    cli, explicit = options.parse(argv, shown=options.CHAT_OPTIONS, description=options.CHAT_DESCRIPTION,
                                  extra=(options.add_chat_options,), prog="chat.py")
    options.check_chat_options(cli)
    if not cli.model_path:
        raise flag_error("--model_path", "is required", "pass a checkpoint folder, e.g. ckpt/run/checkpoint/latest")
    model_path = os.path.realpath(cli.model_path)
    checkpoint.check_model_path(model_path)
    saved = checkpoint.load_options(model_path)
    options.layer_checkpoint_options(cli, explicit, saved)
    if "passages" in explicit and "closed_book" not in explicit:
        cli.closed_book = False  # stories given here for a closed-book (stage-1) reader: retrieve them
    opts = options.validate(cli)
    preflight.check_options(opts)
    # chat trains nothing: the training-only inputs of the checkpoint's run stay off
    opts.posterior_passages, opts.posterior_fact_swap, opts.retriever_signal = False, 0.0, "reply"
    opts.retriever_n_context = max(opts.retriever_n_context, opts.show_stories)
    opts.model_path = model_path
    opts.trained_closed_book = saved.get("closed_book") is True
    return opts, explicit


def read_persona(opts):
    """The persona's sentences in the data's style; one `error:` line when there are none."""
    if opts.persona_file is not None:
        flag = "--persona_file"
        try:
            with open(opts.persona_file, encoding="utf-8") as fh:
                sentences = fh.read().splitlines()
        except FileNotFoundError:
            raise flag_error(flag, f"no such file '{opts.persona_file}'", "pass a text file, one sentence per line") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise flag_error(flag, f"cannot read '{opts.persona_file}' ({exc})", "pass a UTF-8 text file") from None
    else:
        flag, sentences = "--persona", persona_sentences(opts.persona)
    persona = normalize_persona(sentences)
    if not persona:
        raise flag_error(flag, "is empty", PERSONA_FIX)
    return persona


class Chat:
    """A checkpoint's reader (and retriever with its story index) and the turns so far."""

    def __init__(self, opts, explicit, persona, info, say=print):
        self.opts, self.persona, self.info, self.turns = opts, persona, info, []
        self.rng = random.Random(opts.seed)
        path = opts.model_path
        has_retriever = os.path.isdir(os.path.join(path, "retriever"))
        if not opts.closed_book and not has_retriever and "retriever_model_path" not in explicit:
            raise flag_error("--model_path", f"'{path}' was trained with retrieval but has no retriever/ folder",
                             "restore it, or pass --retriever_model_path to retrieve with another retriever")
        passages = None if opts.closed_book else load_passages(opts.passages, opts.max_passages)
        preflight.check_corpus(opts, passages)
        with checkpoint.reading_models(path):
            self.reader = FiDReader.from_pretrained(os.path.join(path, "reader")).to(info.device).eval()
            self.retriever, encoder = None, None
            if passages is not None:
                self.retriever = Retriever.from_pretrained(
                    os.path.join(path, "retriever") if has_retriever else opts.retriever_model_path).to(info.device).eval()
                untied = os.path.join(path, "passage_retriever")  # a query-side-trained checkpoint's story side
                if has_retriever and os.path.isdir(untied):
                    encoder = Retriever.from_pretrained(untied).to(info.device).eval()
        safety.check_loaded_weights({"reader": self.reader, "retriever": self.retriever, "passage_retriever": encoder},
                                    path)
        say(f"persona: {' '.join(persona)}")
        self.retrieval = None
        if passages is None:
            why = ("this checkpoint was trained closed book and no --passages was given" if opts.trained_closed_book
                   else "--closed_book")
            say(f"closed book: {why}, so replies read no story (pass --passages FILE to retrieve stories)")
            return
        self.retrieval = StoryRetrieval(passages, opts, info)
        seconds = self.retrieval.build(encoder or self.retriever)
        say(f"stories: {len(passages)} from {opts.passages}, index built in {seconds:.1f}s; each reply reads the "
            f"top {opts.n_context}")

    def reply(self, text):
        """R's reply to Q's ``text``: (question the reader saw, reply, [(story, score)] retrieved)."""
        o = self.opts
        self.turns.append(("Q", normalize_utterance(text)))
        question = dialogue_question(self.persona, self.turns, o.context_turns)
        b = make_batch([{"question": question, "answers": [""]}], [""], self.reader, self.retrieval, self.retriever, o,
                       self.rng, self.info.device, train=False)
        answer = self.reader.generate_text(b.input_ids, b.attention_mask, **decoding_options(o))[0]
        self.turns.append(("R", answer))
        stories = [] if b.passages is None else list(zip(b.passages[0], b.retrieval_scores[0].tolist()))
        return question, answer, stories

    def show(self, text, say=print):
        question, answer, stories = self.reply(text)
        if self.opts.show_prompt:
            say(f"   (prompt) {question}")
        say(f"R: {answer}")
        for i, (story, score) in enumerate(stories[:self.opts.show_stories], 1):
            title = story.get("title") or " ".join(story["text"].split()[:8]) + " ..."
            say(f"   story {i}: {title} (id {story['id']}, score {score:.3f})")


def interact(chat):
    """Q's lines from the terminal (or piped input, echoed) until /quit or the end of the input."""
    tty = sys.stdin.isatty()
    if tty:
        print("/reset forgets the turns, /quit ends")
    while True:
        try:
            line = input("Q: ") if tty else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not tty:
            if not line:
                return
            print(f"Q: {line.rstrip()}")
        line = line.strip()
        if line == "/quit":
            return
        if line == "/reset":
            chat.turns = []
            print("(the turns are forgotten; the persona stays)")
        elif normalize_utterance(line):
            chat.show(line)


def main(argv=None):
    opts, explicit = chat_options(argv)
    persona = read_persona(opts)
    if opts.once is not None and not normalize_utterance(opts.once):
        raise flag_error("--once", "is empty", 'pass what Q says, e.g. --once "hi , how are you ?"')
    info = distributed.init_distributed(opts.local_rank, opts.dist_timeout)
    options.validate_for_device(opts, info.device.type)
    torch.manual_seed(opts.seed)
    with torch.no_grad():
        chat = Chat(opts, explicit, persona, info)
        if opts.once is not None:
            print(f"Q: {opts.once}")
            chat.show(opts.once)
        else:
            interact(chat)
    distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(exits.run(main))
