"""Generate the project's built-in sample data: persona dialogues plus a story corpus.

Usage: python scripts/make_sample_data.py --out data/sample [--seed 0]

Writes train.jsonl, valid.jsonl, test.jsonl (ConvAI2 format as LAPDOG reads it, plus an extra
``story_id`` field) and stories.jsonl (ROCStories format). Standard library only, and fully
deterministic for a given seed, so the committed files can be checked byte for byte.

Why the data looks the way it does: most replies need a fact (a pet's name, a car's colour)
that exactly one story holds. The persona says *which* story through an arbitrary but fixed
association: the persona owner's job picks a family surname (e.g. nurse -> "the walker
family"), and the persona's topic sentence ("i have a dog.") picks the topic. Every topic
has one story per surname, all sharing the same surface words, so an untrained retriever
cannot tell them apart (it sees "nurse" in the query and only surnames in the stories),
while a retriever trained on (persona, story) pairs can learn the job -> surname rule and
apply it to held-out pairs. Valid and test use stories that no train example uses (and no
story of valid is in test), with personas of their own, so a closed-book reader cannot have
memorised the facts: only reading the right story gives them. Settings are chosen on valid;
results are reported on test.
"""

import argparse
import json
import os
import random
import sys

# Occupations in the persona and the surnames they point to. Each is a single WordPiece of
# bert-base-uncased, and none of the surnames is itself an occupation (no "baker"), so the
# association carries no lexical hint.
JOBS = [
    "nurse", "teacher", "lawyer", "doctor", "chef", "pilot", "farmer", "dentist",
    "painter", "writer", "banker", "soldier", "mechanic", "librarian", "waitress", "engineer",
    "architect", "accountant", "photographer", "journalist", "scientist", "programmer",
    "barber", "surgeon",
]
SURNAMES = [
    "smith", "jones", "johnson", "williams", "davis", "wilson", "moore", "anderson",
    "thomas", "jackson", "harris", "martin", "thompson", "garcia", "robinson", "clark",
    "lewis", "walker", "allen", "young", "wright", "scott", "adams", "nelson",
]

# A topic: persona sentences that say the owner has the thing, fact slots (values are single
# WordPieces), story titles and five-sentence story templates, and (question, reply) pairs
# whose reply repeats the fact words so a reader can copy them from the story.
TOPICS = [
    {
        "key": "dog",
        "persona": ["i have a dog.", "my dog is my best friend.", "i take my dog on long walks."],
        "slots": {
            "name": ["max", "buddy", "rocky", "duke", "bear", "charlie", "cooper", "tucker", "toby", "jack", "lucky"],
            "breed": ["boxer", "labrador", "husky", "shepherd", "bulldog"],
            "toy": ["ball", "stick", "bone", "rope", "sock", "shoe"],
        },
        "titles": ["the new puppy", "the shelter", "a dog for the family", "best friend"],
        "stories": [
            "the {fam} family went to the shelter to find a dog . they met a friendly {breed} in the last cage . the kids named him {name} right away . {name} would not stop chewing on an old {toy} . now the {toy} goes everywhere with him .",
            "the {fam} family wanted a dog for years . one saturday they drove to a farm that had puppies . a little {breed} ran straight to them . they took him home and called him {name} . his favorite thing in the world is a {toy} .",
        ],
        "qa": [
            ("do you have any pets ?", "yes , i have a {breed} named {name} ."),
            ("what is your dog 's name ?", "his name is {name} , he is a sweet boy ."),
            ("what kind of dog is he ?", "he is a {breed} , the best kind of dog ."),
            ("what does your dog like to play with ?", "{name} loves his {toy} more than anything ."),
        ],
    },
    {
        "key": "cat",
        "persona": ["i have a cat.", "my cat sleeps all day.", "i live with my cat."],
        "slots": {
            "name": ["luna", "bella", "lily", "chloe", "molly", "daisy", "kitty", "ginger", "oscar", "felix", "lucy"],
            "color": ["black", "white", "orange", "gray", "brown"],
            "spot": ["box", "basket", "chair", "couch", "window", "sink"],
        },
        "titles": ["the stray cat", "a new kitten", "the cat"],
        "stories": [
            "the {fam} family found a stray kitten in the rain . she was small and {color} and very hungry . they gave her milk and named her {name} . {name} grew up fast and got very lazy . she spends every afternoon asleep in the {spot} .",
            "the {fam} family went to the pet store to buy fish food . they left with a {color} kitten instead . the kids decided to call her {name} . {name} ignored every bed they bought her . she only wants to sleep in the {spot} .",
        ],
        "qa": [
            ("do you have any pets ?", "i have a {color} cat named {name} ."),
            ("what is your cat 's name ?", "her name is {name} , she is very lazy ."),
            ("what color is your cat ?", "she is {color} , and very fluffy ."),
            ("where does your cat like to sleep ?", "{name} always sleeps in the {spot} ."),
        ],
    },
    {
        "key": "horse",
        "persona": ["i own a horse.", "i ride my horse every weekend.", "i grew up riding horses."],
        "slots": {
            "name": ["star", "thunder", "storm", "spirit", "blaze", "dusty", "apollo", "midnight", "flash"],
            "color": ["black", "white", "brown", "gray", "golden"],
            "treat": ["apples", "carrot", "sugar", "hay", "corn"],
        },
        "titles": ["the horse", "riding lessons", "a horse of our own"],
        "stories": [
            "the {fam} family bought an old farm last spring . the farm came with a {color} horse named {name} . nobody in the family knew how to ride . they learned slowly and {name} was very patient . they thank him every day with {treat} .",
            "the {fam} family took riding lessons all summer . their teacher let them ride a {color} horse called {name} . at the end of the summer the teacher sold {name} to them . the kids brush him every morning . he will do anything for {treat} .",
        ],
        "qa": [
            ("what is your horse 's name ?", "his name is {name} , he is a gentle giant ."),
            ("what color is your horse ?", "{name} is {color} , he is beautiful ."),
            ("what does your horse like to eat ?", "he loves {treat} , i always bring some ."),
            ("tell me about your horse .", "he is a {color} horse named {name} ."),
        ],
    },
    {
        "key": "car",
        "persona": ["i just bought a car.", "i love my car.", "i drive everywhere."],
        "slots": {
            "brand": ["honda", "toyota", "ford", "nissan", "jeep", "volvo", "dodge", "chevy"],
            "color": ["red", "blue", "silver", "black", "green", "yellow"],
            "city": ["denver", "boston", "chicago", "dallas", "seattle", "phoenix", "atlanta", "miami", "memphis", "austin"],
        },
        "titles": ["the new car", "road trip", "car shopping"],
        "stories": [
            "the {fam} family needed a new car . they looked at many cars for weeks . finally they bought a {color} {brand} . the first trip they took was to {city} . the car made it there without a problem .",
            "the {fam} family saved money for a long time . they walked into the dealer with cash . they drove out in a shiny {color} {brand} . that weekend they drove all the way to {city} . they sang songs the whole way .",
        ],
        "qa": [
            ("what kind of car do you drive ?", "i drive a {brand} , i love it ."),
            ("what color is your car ?", "it is {color} , you can not miss it ."),
            ("have you taken any road trips ?", "yes , i drove my {brand} to {city} ."),
            ("tell me about your car .", "it is a {color} {brand} , pretty new ."),
        ],
    },
    {
        "key": "boat",
        "persona": ["i have a boat.", "i love to go fishing on my boat.", "i spend summers on the water."],
        "slots": {
            "name": ["grace", "hope", "stella", "pearl", "ruby", "sunny", "pepper"],
            "fish": ["bass", "trout", "salmon", "catfish", "perch", "pike", "cod", "tuna"],
            "color": ["red", "blue", "white", "green", "yellow"],
        },
        "titles": ["the boat", "gone fishing", "a day on the lake"],
        "stories": [
            "the {fam} family bought a used boat . it was small and painted {color} . they named the boat {name} after an old aunt . on their first trip they caught a big {fish} . they cooked it that night on the shore .",
            "the {fam} family spent a year fixing up an old boat . they painted it {color} and gave it a new motor . they called the boat {name} . the first day out they caught three {fish} . now they go out every sunday .",
        ],
        "qa": [
            ("what is the name of your boat ?", "she is called {name} ."),
            ("what do you catch when you fish ?", "mostly {fish} , they are tasty ."),
            ("what does your boat look like ?", "it is {color} , small but fast ."),
            ("tell me about your boat .", "her name is {name} and she is {color} ."),
        ],
    },
    {
        "key": "band",
        "persona": ["i play in a band.", "music is my life.", "i play music on weekends."],
        "slots": {
            "band": ["comets", "rebels", "ravens", "wolves", "tigers", "sparks", "giants", "pirates", "eagles"],
            "instrument": ["guitar", "drums", "piano", "violin", "trumpet", "cello", "flute"],
            "city": ["denver", "boston", "chicago", "dallas", "seattle", "phoenix", "atlanta", "memphis"],
        },
        "titles": ["the band", "first show", "the garage band"],
        "stories": [
            "the {fam} family started a band in their garage . everyone in the family played something , mostly {instrument} . they called themselves the {band} . their first real show was in {city} . the crowd asked for one more song .",
            "the {fam} family loved music more than anything . the kids learned {instrument} from their uncle . together they formed a band called the {band} . they saved up for a tour that started in {city} . it was the best summer of their lives .",
        ],
        "qa": [
            ("what is your band called ?", "we are the {band} , look us up ."),
            ("what do you play ?", "i play the {instrument} , since i was a kid ."),
            ("where have you played shows ?", "our best show was in {city} ."),
            ("tell me about your band .", "we are called the {band} and i play {instrument} ."),
        ],
    },
    {
        "key": "garden",
        "persona": ["i love to garden.", "i grow my own food.", "i spend hours in my garden."],
        "slots": {
            "veg": ["tomatoes", "beans", "peppers", "potatoes", "onions", "corn", "peas", "cabbage"],
            "flower": ["roses", "lily", "daisy", "iris"],
            "pest": ["rabbits", "deer", "squirrels", "crows", "snails", "beetles"],
        },
        "titles": ["the garden", "growing season", "the vegetable patch"],
        "stories": [
            "the {fam} family planted a garden behind the house . they grew rows and rows of {veg} . along the fence they planted {flower} for their mother . all summer the {pest} tried to eat everything . the family built a tall fence and won .",
            "the {fam} family decided to grow their own food . they started small with some {veg} . then they added {flower} because they looked pretty . soon {pest} found the garden and ate half of it . next year they plan to be ready .",
        ],
        "qa": [
            ("what do you grow in your garden ?", "mostly {veg} , they grow really well ."),
            ("do you grow flowers too ?", "yes , i grow {flower} along the fence ."),
            ("is it hard to keep a garden ?", "the {pest} are a problem , they eat everything ."),
            ("what is your favorite thing to grow ?", "i love my {veg} and my {flower} ."),
        ],
    },
    {
        "key": "grandmother",
        "persona": ["i am very close to my grandmother.", "my grandma raised me.", "i visit my grandmother often."],
        "slots": {
            "name": ["rose", "ruth", "mary", "helen", "alice", "jean", "betty", "dorothy"],
            "dish": ["pie", "soup", "cookies", "bread", "pancakes", "stew", "cake"],
            "city": ["paris", "rome", "london", "dublin", "vienna", "athens", "madrid", "berlin"],
        },
        "titles": ["grandma", "the recipe", "sunday dinner"],
        "stories": [
            "the {fam} family visits grandma {name} every sunday . she always makes her famous {dish} . she learned to make it when she lived in {city} as a girl . the kids fight over the last piece . grandma {name} just laughs and makes more .",
            "grandma {name} moved in with the {fam} family last winter . she grew up in {city} and tells stories about it . every friday she bakes {dish} for everyone . the whole house smells wonderful . the family is glad she is there .",
        ],
        "qa": [
            ("what is your grandmother 's name ?", "her name is {name} , she is the best ."),
            ("what does she like to cook ?", "she makes amazing {dish} every week ."),
            ("where is she from ?", "she grew up in {city} ."),
            ("tell me about your grandmother .", "grandma {name} grew up in {city} and cooks {dish} ."),
        ],
    },
    {
        "key": "bird",
        "persona": ["i have a pet bird.", "my bird talks to me.", "i love birds."],
        "slots": {
            "name": ["sunny", "mango", "pepper", "peanut", "buddy", "charlie", "rio", "coco"],
            "kind": ["parrot", "canary", "finch", "robin"],
            "word": ["hello", "pretty", "thanks", "yes", "goodbye", "dinner"],
        },
        "titles": ["the bird", "a talking bird", "the pet shop"],
        "stories": [
            "the {fam} family bought a {kind} at the pet shop . the kids named the bird {name} . {name} was shy for the first week . then one morning he said {word} . now he says {word} to everyone who walks in .",
            "the {fam} family found a hurt {kind} in the yard . they nursed it back to health and called it {name} . {name} decided to stay with them . the kids taught him to say {word} . he says {word} all day long .",
        ],
        "qa": [
            ("what kind of bird do you have ?", "a {kind} named {name} ."),
            ("what is your bird 's name ?", "his name is {name} , he is funny ."),
            ("can your bird talk ?", "yes ! he says {word} all the time ."),
            ("tell me about your bird .", "{name} is a {kind} and he loves to say {word} ."),
        ],
    },
    {
        "key": "trip",
        "persona": ["i love to travel.", "i just got back from a vacation.", "i travel every summer."],
        "slots": {
            "city": ["paris", "rome", "tokyo", "london", "madrid", "berlin", "dublin", "vienna", "athens"],
            "food": ["pizza", "pasta", "bread", "cheese", "soup", "steak", "chocolate"],
            "month": ["june", "july", "august", "april", "may", "october"],
        },
        "titles": ["the vacation", "a trip abroad", "summer trip"],
        "stories": [
            "the {fam} family saved all year for a big trip . in {month} they flew to {city} . they walked around the city for days . the best part was the {food} they ate every night . they want to go back next year .",
            "the {fam} family won a trip in a contest . they could pick any city and chose {city} . they left in {month} and stayed two weeks . they could not stop eating the {food} . it was the trip of a lifetime .",
        ],
        "qa": [
            ("where did you go on your last trip ?", "i went to {city} , it was amazing ."),
            ("when did you go ?", "we went in {month} , the weather was nice ."),
            ("what was the food like ?", "the {food} was the best i ever had ."),
            ("tell me about your trip .", "we went to {city} in {month} ."),
        ],
    },
    {
        "key": "brother",
        "persona": ["i have a younger brother.", "my little brother looks up to me.", "i am the oldest child."],
        "slots": {
            "name": ["mike", "tom", "sam", "ben", "joe", "dan", "nick", "alex", "chris", "kevin"],
            "sport": ["soccer", "hockey", "tennis", "baseball", "football", "golf"],
            "age": ["ten", "twelve", "eleven", "nine", "fifteen", "thirteen"],
        },
        "titles": ["little brother", "the big game", "the tryout"],
        "stories": [
            "the youngest {fam} boy is named {name} . he is {age} years old and loves {sport} . he practiced every day after school . this year he made the team . the whole family came to cheer at his first game .",
            "{name} {fam} turned {age} last month . for his birthday he asked for new {sport} gear . his family surprised him with everything he wanted . he wore it to practice the next day . he scored twice and smiled all night .",
        ],
        "qa": [
            ("what is your brother 's name ?", "his name is {name} , he is a good kid ."),
            ("how old is your brother ?", "he is {age} , growing up fast ."),
            ("does he play any sports ?", "yes , he plays {sport} , he is really good ."),
            ("tell me about your brother .", "{name} is {age} and he loves {sport} ."),
        ],
    },
    {
        "key": "wedding",
        "persona": ["i just got married.", "i love my wife.", "i am a newlywed."],
        "slots": {
            "name": ["emma", "sarah", "anna", "kate", "julia", "laura", "megan", "amy"],
            "place": ["beach", "church", "barn", "park", "lake", "garden"],
            "month": ["june", "july", "august", "april", "may", "october", "september"],
        },
        "titles": ["the wedding", "the big day", "wedding plans"],
        "stories": [
            "the oldest {fam} son married a girl named {name} . they met in college and dated for years . they had the wedding at a {place} in {month} . everyone danced until midnight . it was the happiest day of their lives .",
            "{name} had been friends with the {fam} family forever . she fell in love with their oldest son . they got married in {month} . the ceremony was at a small {place} near town . the whole family cried happy tears .",
        ],
        "qa": [
            ("what is your wife 's name ?", "her name is {name} , she is wonderful ."),
            ("where was the wedding ?", "we got married at a {place} ."),
            ("when did you get married ?", "in {month} , it was perfect ."),
            ("tell me about your wedding .", "i married {name} at a {place} in {month} ."),
        ],
    },
]

GREETINGS = [
    ("hi ! how are you today ?", "i am good , thanks . how are you ?"),
    ("hello , how is your day going ?", "pretty good , just relaxing . you ?"),
    ("hey there ! what are you up to ?", "not much , just got home . how about you ?"),
    ("hi , how are you doing tonight ?", "i am doing great , thank you for asking ."),
    ("good evening ! how are things ?", "things are good , a long day though ."),
]

# Persona filler sentences with a chit-chat question and reply each; none mentions a topic
# word, a job or a surname, so they add realistic noise without leaking the link.
FILLERS = [
    ("i like to read.", "what do you do for fun ?", "i read a lot , mostly mystery books ."),
    ("i love pizza.", "what is your favorite food ?", "pizza , i could eat it every day ."),
    ("my favorite color is purple.", "what is your favorite color ?", "purple , it is so pretty ."),
    ("i like to go hiking.", "what do you do on weekends ?", "i go hiking in the hills ."),
    ("i am afraid of the dark.", "are you scared of anything ?", "the dark , i sleep with a light on ."),
    ("i enjoy watching movies.", "do you watch movies ?", "yes , i watch one every night ."),
    ("i like to bake.", "do you have any hobbies ?", "i like to bake on weekends ."),
    ("i drink a lot of coffee.", "do you drink coffee ?", "too much , like five cups a day ."),
    ("i am a morning person.", "are you a morning person ?", "yes , i am up at five every day ."),
    ("i love the beach.", "do you like the beach ?", "i love it , the sand and the sun ."),
    ("i listen to country music.", "what music do you like ?", "country music , all day long ."),
    ("i am learning to speak spanish.", "are you learning anything new ?", "spanish , it is hard but fun ."),
    ("i like to play video games.", "do you play games ?", "video games , mostly at night ."),
    ("i hate the cold.", "do you like winter ?", "no , i hate the cold ."),
    ("i go to the gym every day.", "do you work out ?", "every day at the gym , it helps me relax ."),
    ("i collect old coins.", "do you collect anything ?", "old coins , i have hundreds ."),
    ("i am a vegetarian.", "do you eat meat ?", "no , i am a vegetarian ."),
    ("i like to sing in the shower.", "do you sing ?", "only in the shower , i am not good ."),
]

JOB_LINES = ["i work as a {job}.", "i am a {job}.", "my job is being a {job}."]
JOB_QA = [
    ("what do you do for work ?", "i am a {job} , it keeps me busy ."),
    ("do you work ?", "yes , i work as a {job} ."),
]
REACTIONS = ["", "", "nice . ", "cool ! ", "oh wow . ", "that is great . ", "i see . "]

HELD_OUT_STORIES_PER_TOPIC = 3  # 12 topics x 3 = 36 held-out (persona, story) cells each for valid and test


def _article(word):
    return "an" if word[0] in "aeiou" else "a"


def _job_phrase(template, job):
    """Persona/reply text with the right article before the job ("an engineer")."""
    return template.replace("a {job}", _article(job) + " {job}").format(job=job)


def make_stories(rng):
    """One story per (topic, surname) cell; returns (stories, cell -> story dict).

    Stories are listed in a shuffled order with ids "0".."N-1", so an id says nothing about
    its topic or family.
    """
    cells = [(t, f) for t in range(len(TOPICS)) for f in range(len(SURNAMES))]
    rng.shuffle(cells)
    stories, by_cell = [], {}
    for idx, (t, f) in enumerate(cells):
        topic = TOPICS[t]
        facts = {slot: rng.choice(values) for slot, values in topic["slots"].items()}
        text = rng.choice(topic["stories"]).format(fam=SURNAMES[f], **facts)
        story = {"id": str(idx), "title": rng.choice(topic["titles"]), "text": text}
        stories.append(story)
        by_cell[(t, f)] = (story, facts)
    return stories, by_cell


def make_persona(rng, job, topic, used):
    """A persona string (job line, topic line, two fillers, shuffled) not in ``used``."""
    while True:
        fillers = rng.sample(FILLERS, 2)
        lines = [_job_phrase(rng.choice(JOB_LINES), job), rng.choice(topic["persona"])]
        lines += [f[0] for f in fillers]
        rng.shuffle(lines)
        persona = " ".join(lines)
        if persona not in used:
            used.add(persona)
            return persona, fillers


def make_dialogue(rng, persona, job, topic, facts, fillers, story_id):
    """Examples for one conversation: one per R turn, the question ends with the Q turn."""
    greet_q, greet_r = rng.choice(GREETINGS)
    turns = [(greet_q, greet_r, None)]
    fact_qas = rng.sample(topic["qa"], rng.choice([3, 4, 4, 4]))
    segments = [(q, r.format(**facts), story_id) for q, r in fact_qas]
    n_chit = rng.choice([0, 0, 1, 1, 2])
    chit = [(q, _job_phrase(r, job), None) for q, r in JOB_QA] + [(f[1], f[2], None) for f in fillers]
    segments += rng.sample(chit, n_chit)
    rng.shuffle(segments)
    turns += segments

    examples, history = [], []
    for i, (q, r, sid) in enumerate(turns):
        history.append("Q: " + (rng.choice(REACTIONS) if i else "") + q)
        # Three utterances of context, like the real ConvAI2 lines.
        context = " ".join(history[-3:])
        examples.append({
            "question": f"persona: {persona} context:  {context}",
            "answers": [r],
            "story_id": sid,
        })
        history.append("R: " + r)
    return examples


def generate(seed=0):
    """Returns (train, valid, test, stories) as lists of dicts, deterministic in ``seed``."""
    rng = random.Random(seed)
    # The job -> surname association is itself drawn from the seed: arbitrary, but fixed.
    fam_of_job = list(range(len(SURNAMES)))
    rng.shuffle(fam_of_job)
    job_of_fam = {f: j for j, f in enumerate(fam_of_job)}

    stories, by_cell = make_stories(rng)

    # Held-out cells: a few surnames per topic for valid and the next few for test, spread so
    # each job keeps train examples.
    held = {"valid": set(), "test": set()}
    n, per = len(SURNAMES), HELD_OUT_STORIES_PER_TOPIC
    for t in range(len(TOPICS)):
        start = (t * 2 * per) % n
        for k in range(per):
            held["valid"].add((t, (start + k) % n))
            held["test"].add((t, (start + per + k) % n))
    train_cells = sorted(set(by_cell) - held["valid"] - held["test"])
    valid_cells, test_cells = sorted(held["valid"]), sorted(held["test"])
    rng.shuffle(train_cells)
    rng.shuffle(valid_cells)
    rng.shuffle(test_cells)
    # Every train cell gets one persona and half of them a second one (~2000 examples), so
    # the retriever sees each job with several topics and several personas.
    train_cells = train_cells + train_cells[: len(train_cells) // 2]
    rng.shuffle(train_cells)

    used = set()
    splits = {}
    for name, cells in (("train", train_cells), ("valid", valid_cells), ("test", test_cells)):
        examples = []
        for t, f in cells:
            topic, job = TOPICS[t], JOBS[job_of_fam[f]]
            story, facts = by_cell[(t, f)]
            persona, fillers = make_persona(rng, job, topic, used)
            examples += make_dialogue(rng, persona, job, topic, facts, fillers, story["id"])
        splits[name] = examples
    return splits["train"], splits["valid"], splits["test"], stories


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/sample", help="output folder (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0: the committed files)")
    args = parser.parse_args(argv)
    train, valid, test, stories = generate(args.seed)
    os.makedirs(args.out, exist_ok=True)
    for name, rows in (("train", train), ("valid", valid), ("test", test), ("stories", stories)):
        write_jsonl(os.path.join(args.out, f"{name}.jsonl"), rows)
    print(f"wrote {len(train)} train, {len(valid)} valid, {len(test)} test examples and {len(stories)} stories "
          f"to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
