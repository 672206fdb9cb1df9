"""Writes data/sample/trn_sample.jsonl: invented products in the AmazonTitles-1.3MM trn.json format.

    python data/sample/make_sample.py            # deterministic: the committed file is its output

Every product, brand and description here is invented by this script (nothing is copied from the dump).
The file mimics the dump's shape: `uid`, `title`, `content`, `target_ind`, `target_rel` per line; about
a third of the rows have empty content; HTML entities, tags, accents and non-NFC text appear as in
scraped text; and it holds every kind of bad line that stage 01 must reject or filter, listed in BAD_LINES.
"""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

SEED = 20261124
N_PRODUCTS = 560

BRANDS = ["Nordvik", "Halcyon", "Brightwell", "Tamarind & Co", "Kestrel", "Opaline", "Ridgeway", "Lumora",
          "Crème Maison", "Azura", "Birchmont", "Quillon", "Verano", "Solstice", "Pemberly", "Café Rivière"]
COLORS = ["Black", "Navy Blue", "Forest Green", "Charcoal Gray", "Crimson Red", "Ivory", "Teal", "Mustard Yellow",
          "Blush Pink", "Slate"]

CATEGORIES = {
    "bottle": {
        "title": ["{brand} Insulated Water Bottle {size} ml, {color}", "{brand} Stainless Steel Bottle, {size} ml, Leak-Proof Lid"],
        "size": [350, 500, 750, 1000],
        "facts": ["Double-wall vacuum insulation keeps drinks cold for {h1} hours and hot for {h2} hours.",
                  "Made from 18/8 food-grade stainless steel; BPA-free lid.",
                  "Holds {size} ml &#8211; enough for a long hike or a full work day.",
                  "The powder-coated finish resists scratches and gives a sure grip.",
                  "Wide mouth fits ice cubes and is easy to clean; dishwasher-safe lid.",
                  "Weighs only {w} g when empty."],
    },
    "tutu": {
        "title": ["{brand} Girls Ballet Tutu Skirt {color}", "{brand} Layered Tulle Tutu for Girls, {color}"],
        "size": [2, 3, 4],
        "facts": ["Soft {size}-layer tulle tutu with an elastic waistband for a comfortable fit.",
                  "Fits girls ages {a1}&#8211;{a2} years; length {l} inches.",
                  "Perfect for dance practice, recitals, birthday parties or dress-up.",
                  "Hand wash cold and lay flat to dry.",
                  "Satin-lined waistband will not itch or scratch."],
    },
    "book": {
        "title": ["The {adj} {noun}: A Novel", "{adj} {noun} (Paperback)", "A Field Guide to {noun}s"],
        "size": [1],
        "facts": ["{brand}&#8217;s {ord} book follows a young {job} who discovers a hidden {noun2} in a small coastal town.",
                  "A warm, funny and surprising story about family, courage and second chances.",
                  "{pages} pages. Recommended for readers aged {a1} and up.",
                  "&quot;Impossible to put down&quot; &#8212; readers on the first edition.",
                  "Includes a reading-group guide and an interview with the author."],
    },
    "cookware": {
        "title": ["{brand} Non-Stick Frying Pan {size} cm", "{brand} Cast Iron Skillet, {size} cm, Pre-Seasoned"],
        "size": [20, 24, 28, 30],
        "facts": ["{size} cm pan with a {layers}-layer non-stick coating; PFOA-free.",
                  "Works on gas, electric, ceramic and induction hobs.",
                  "Oven-safe up to {temp} °C (handle included).",
                  "Riveted stay-cool handle for a secure grip.",
                  "Heats evenly thanks to a {mm} mm thick aluminium base.",
                  "Dishwasher-safe, though hand washing keeps the coating longer."],
    },
    "headphones": {
        "title": ["{brand} Wireless Over-Ear Headphones, Bluetooth 5.3, {color}", "{brand} Noise-Cancelling Earbuds, {color}"],
        "size": [1],
        "facts": ["Up to {h1} hours of playback on a single charge; {m} minutes of charging gives {h3} hours.",
                  "Active noise cancellation reduces traffic and engine noise.",
                  "Bluetooth 5.3 with multipoint: connect a phone and a laptop at once.",
                  "Built-in microphone for calls and voice assistants.",
                  "Soft memory-foam ear cushions and an adjustable headband.",
                  "Includes a USB-C cable and a travel case."],
    },
    "backpack": {
        "title": ["{brand} Laptop Backpack {size} L, Water-Resistant, {color}", "{brand} Hiking Daypack {size}L"],
        "size": [18, 22, 28, 35],
        "facts": ["{size} L main compartment with a padded sleeve for laptops up to {inch}&quot;.",
                  "Water-resistant {den}D polyester shell and YKK zips.",
                  "Breathable mesh back panel and padded shoulder straps.",
                  "Side pockets hold a water bottle or an umbrella.",
                  "Luggage strap slides over a suitcase handle.",
                  "Weighs {w} g."],
    },
    "tea": {
        "title": ["{brand} Organic {tea} Tea, {size} Tea Bags", "{brand} Loose Leaf {tea} Tea, {size} g Tin"],
        "size": [20, 50, 100],
        "facts": ["Certified organic {tea} tea from small farms.",
                  "Steep for {m2}&#8211;{m3} minutes in water at {temp2} °C.",
                  "Naturally {caf}; no artificial flavours.",
                  "Each pack holds {size} servings, sealed for freshness.",
                  "Tasting notes: {note1}, {note2} and a clean finish."],
    },
    "lamp": {
        "title": ["{brand} LED Desk Lamp with USB Charging Port, {color}", "{brand} Dimmable Bedside Lamp, {color}"],
        "size": [1],
        "facts": ["{modes} colour modes and {levels} brightness levels, from warm 2700 K to daylight 6500 K.",
                  "Flicker-free LEDs rated for {life} hours.",
                  "Built-in USB-A port charges a phone while you work.",
                  "Touch control and a {m}-minute auto-off timer.",
                  "Uses only {watt} W &#8211; about 80% less than an incandescent bulb."],
    },
    "toy": {
        "title": ["{brand} Wooden Building Blocks Set, {size} Pieces", "{brand} Magnetic Tiles, {size} Pcs, Ages {a1}+"],
        "size": [30, 60, 100, 120],
        "facts": ["{size} pieces in {n} shapes and bright, child-safe water-based paints.",
                  "Recommended for ages {a1} and up; builds fine-motor and spatial skills.",
                  "Comes in a sturdy storage box with a sorting lid.",
                  "Smooth sanded edges, no splinters.",
                  "Compatible with most other block sets of the same size."],
    },
    "yoga": {
        "title": ["{brand} Yoga Mat {mm} mm, Non-Slip, {color}", "{brand} Extra Thick Exercise Mat {mm}mm"],
        "size": [4, 6, 8, 10],
        "facts": ["{mm} mm thick TPE foam cushions knees and joints.",
                  "Measures 183 &times; 61 cm; weighs {kg} kg.",
                  "Textured, non-slip surface on both sides.",
                  "Free of latex, PVC and phthalates.",
                  "Includes a carrying strap; wipe clean with a damp cloth."],
    },
}

ADJ = ["Silent", "Lighthouse", "Summer", "Hidden", "Paper", "Winter", "Copper", "Last", "Wandering", "Quiet"]
NOUN = ["Harbor", "Garden", "Orchard", "Keeper", "Atlas", "River", "Lantern", "Meadow", "Clockmaker", "Island"]
JOBS = ["baker", "cartographer", "violinist", "nurse", "beekeeper", "architect"]
TEAS = ["Green", "Earl Grey", "Chamomile", "Rooibos", "Oolong", "Peppermint", "Darjeeling"]
NOTES = ["honey", "citrus", "toasted rice", "malt", "jasmine", "stone fruit", "mint"]
ORD = ["first", "second", "third", "long-awaited fourth"]


def _fill(t: str, v: dict) -> str:
    return t.format(**v)


def make_product(rng: random.Random, i: int) -> dict:
    cat = rng.choice(list(CATEGORIES))
    spec = CATEGORIES[cat]
    v = {
        "brand": rng.choice(BRANDS), "color": rng.choice(COLORS), "size": rng.choice(spec["size"]),
        "h1": rng.choice([12, 20, 24, 30, 40]), "h2": rng.choice([6, 8, 12]), "h3": rng.choice([2, 3, 5]),
        "w": rng.choice([280, 350, 420, 640, 780]), "a1": rng.choice([2, 3, 4, 6, 8]), "a2": rng.choice([7, 8, 10]),
        "l": rng.choice([11, 12, 13]), "adj": rng.choice(ADJ), "noun": rng.choice(NOUN), "noun2": rng.choice(NOUN).lower(),
        "job": rng.choice(JOBS), "ord": rng.choice(ORD), "pages": rng.choice([224, 288, 312, 368, 416]),
        "layers": rng.choice([2, 3, 5]), "temp": rng.choice([180, 220, 260]), "mm": rng.choice([4, 5, 6, 8, 10]),
        "m": rng.choice([10, 15, 30, 60]), "inch": rng.choice([14, 15.6, 17]), "den": rng.choice([300, 600, 900]),
        "tea": rng.choice(TEAS), "m2": rng.choice([2, 3]), "m3": rng.choice([4, 5]), "temp2": rng.choice([80, 90, 100]),
        "caf": rng.choice(["caffeine-free", "low in caffeine", "rich in caffeine"]), "note1": rng.choice(NOTES),
        "note2": rng.choice(NOTES), "modes": rng.choice([3, 4, 5]), "levels": rng.choice([5, 7, 10]),
        "life": rng.choice([25000, 50000]), "watt": rng.choice([5, 8, 10]), "n": rng.choice([6, 8, 12]),
        "kg": rng.choice([0.9, 1.1, 1.4]),
    }
    if cat == "yoga":
        v["size"] = v["mm"]
    title = _fill(rng.choice(spec["title"]), v)
    facts = [_fill(f, v) for f in spec["facts"]]
    rng.shuffle(facts)
    content = " ".join(facts[: rng.randint(3, len(facts))])
    return {"uid": f"B{100000000 + i * 7919 % 900000000:09d}", "title": title, "content": content, "category": cat}


def decorate(rng: random.Random, row: dict) -> dict:
    """Give some rows the artefacts of scraped text: tags, double-escaped entities, NFD accents, spaces."""
    c = row["content"]
    r = rng.random()
    if r < 0.12:
        c = c.replace(". ", ".<br />", 1)
    elif r < 0.2:
        c = "<p>" + c.replace(". ", ".</p><p>", 1) + "</p>"
    elif r < 0.26:
        c = c.replace("&#8211;", "&amp;#8211;")
    elif r < 0.3:
        c = unicodedata.normalize("NFD", c + " Designed in Café Rivière.")
    elif r < 0.34:
        c = "  " + c.replace(" ", "   ", 2) + "\t\n"
    row["content"] = c
    return row


# Bad or filtered lines: (description, raw line). Each must be rejected or filtered by stage 01.
BAD_LINES = [
    ("bad_json", b'{"uid": "X0000001", "title": "Broken Row", "content": "no closing brace"'),
    ("bad_json", b'{"uid": "X0000002", title: "unquoted key"}'),
    ("bad_utf8", b'{"uid": "X0000003", "title": "Caf\xe9 Latin-1 Mug", "content": "Bytes that are not UTF-8 \xff\xfe."}'),
    ("not_an_object", b'["X0000004", "A list, not an object", "content"]'),
    ("not_an_object", b'"just a string"'),
    ("missing_field:uid", b'{"title": "No Uid Here", "content": "' + b"A description without a uid field. " * 4 + b'"}'),
    ("missing_field:title", b'{"uid": "X0000006", "content": "No title field at all, which cannot be used."}'),
    ("missing_field:content", b'{"uid": "X0000007", "title": "No Content Key"}'),
    ("bad_type:content", b'{"uid": "X0000008", "title": "Numeric Content", "content": 12345}'),
    ("bad_type:title", b'{"uid": "X0000009", "title": null, "content": "Null title."}'),
    ("bad_type:content", b'{"uid": "X0000010", "title": "List Content", "content": ["a", "b"]}'),
    ("bad_type:uid", b'{"uid": null, "title": "Null Uid Product", "content": "' + b"Null uid rows appear in scraped copies. " * 3 + b'"}'),
    ("blank_line", b""),
    ("blank_line", b"   "),
]


def main() -> None:
    rng = random.Random(SEED)
    products = [decorate(rng, make_product(rng, i)) for i in range(N_PRODUCTS)]
    lines: list[bytes] = []
    for i, p in enumerate(products):
        row = {"uid": p["uid"], "title": p["title"], "content": p["content"]}
        k = rng.random()
        if k < 0.30:
            row["content"] = ""  # as in the dump, many products have no description
        elif k < 0.34:
            row["content"] = p["content"][: rng.randint(20, 90)].rsplit(" ", 1)[0]  # too short
        elif k < 0.36:
            row["content"] = (p["content"] + " ") * 12  # over-long: truncated at 2000 chars
        row["target_ind"] = sorted(rng.sample(range(2000), rng.randint(1, 6)))
        row["target_rel"] = [1.0] * len(row["target_ind"])
        lines.append(json.dumps(row).encode())
        if i % 97 == 5:  # exact duplicate uid (the dump repeats some products)
            lines.append(json.dumps(row).encode())
        if i % 89 == 7 and row["content"]:  # same title+content under another uid
            lines.append(json.dumps({**row, "uid": row["uid"][:-1] + "Z"}).encode())
    lines.append(json.dumps({"uid": "X0000011", "title": "   ", "content": "Whitespace-only title."}).encode())
    lines.append(json.dumps({"uid": "X0000012", "title": "<b></b>", "content": "A title that is only tags."}).encode())
    for j, (_, raw) in enumerate(BAD_LINES):
        lines.insert(17 + j * 37, raw)
    out = Path(__file__).with_name("trn_sample.jsonl")
    out.write_bytes(b"\n".join(lines) + b"\n")
    print(f"wrote {len(lines)} lines to {out}")


if __name__ == "__main__":
    main()
