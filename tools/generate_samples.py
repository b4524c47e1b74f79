"""Regenerate the `generated-*.jsonl` built-in samples (deterministic; no network).

    python tools/generate_samples.py

It writes into apex_orch/calibration/samples/ (the package's data); it is a tool of the checkout,
not part of the package, so the wheel carries its output and not it.

Hand-written samples live beside them (`*.jsonl` without the `generated-` prefix). The
generated ones vary entities, numbers and phrasing over scenarios written for this
project; every number in an answer is computed here, so tool results and final answers
agree and worked solutions are correct. Same seed, same bytes: the corpus sha256 (and so
the imatrix cache key) only changes when this file or a hand-written sample changes.
"""

from __future__ import annotations

import json
import math
import random
import string
from fractions import Fraction
from pathlib import Path

# The samples folder of the package this checkout holds.
HERE = Path(__file__).resolve().parent.parent / "apex_orch" / "calibration" / "samples"
SEED = 20250101
ALNUM = string.ascii_letters + string.digits


def call_id(rng: random.Random) -> str:
    # Nine alphanumerics: what Mistral-family templates require of tool call ids.
    return "".join(rng.choice(ALNUM) for _ in range(9))


def tool(name: str, description: str, params: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description,
                                             "parameters": {"type": "object", "properties": params,
                                                            "required": required}}}


def s(desc: str, **extra) -> dict:
    return {"type": "string", "description": desc, **extra}


def n(desc: str, kind: str = "number", **extra) -> dict:
    return {"type": kind, "description": desc, **extra}


def call(rng, name: str, args: dict) -> dict:
    return {"id": call_id(rng), "type": "function", "function": {"name": name, "arguments": args}}


def assistant_calls(calls: list[dict], content: str = "") -> dict:
    return {"role": "assistant", "content": content, "tool_calls": calls}


def result(c: dict, payload) -> dict:
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return {"role": "tool", "tool_call_id": c["id"], "name": c["function"]["name"], "content": text}


def fmt_money(x: float, cur: str = "") -> str:
    text = f"{x:,.2f}"
    return f"{text} {cur}".strip()


# =============================================================================== tool calling

TOOLS = {
    "get_weather": tool("get_weather", "Current weather for a city.",
                        {"city": s("City name, optionally with country"),
                         "unit": s("Temperature unit", enum=["celsius", "fahrenheit"])}, ["city"]),
    "get_forecast": tool("get_forecast", "Daily forecast for the next days.",
                         {"city": s("City name"), "days": n("Number of days, 1-7", "integer")}, ["city", "days"]),
    "convert_currency": tool("convert_currency", "Convert an amount between currencies at today's rate.",
                             {"amount": n("Amount to convert"), "from": s("ISO 4217 code of the source currency"),
                              "to": s("ISO 4217 code of the target currency")}, ["amount", "from", "to"]),
    "search_flights": tool("search_flights", "Search direct and one-stop flights.",
                           {"origin": s("IATA airport code"), "destination": s("IATA airport code"),
                            "date": s("Departure date, YYYY-MM-DD"),
                            "passengers": n("Number of adult passengers", "integer")},
                           ["origin", "destination", "date"]),
    "create_event": tool("create_event", "Create an event in the user's calendar.",
                         {"title": s("Event title"), "start": s("Start, ISO 8601 local time"),
                          "end": s("End, ISO 8601 local time"),
                          "attendees": {"type": "array", "items": {"type": "string"},
                                        "description": "Email addresses to invite"}},
                         ["title", "start", "end"]),
    "get_stock_quote": tool("get_stock_quote", "Latest quote for a stock ticker.",
                            {"symbol": s("Ticker symbol")}, ["symbol"]),
    "lookup_order": tool("lookup_order", "Look up an order in the shop database.",
                         {"order_id": s("Order number, e.g. A-10442")}, ["order_id"]),
    "calculate": tool("calculate", "Evaluate an arithmetic expression exactly.",
                      {"expression": s("Expression using + - * / ** and parentheses")}, ["expression"]),
    "convert_units": tool("convert_units", "Convert a quantity between units.",
                          {"value": n("Quantity"), "from_unit": s("Unit of the value"),
                           "to_unit": s("Target unit")}, ["value", "from_unit", "to_unit"]),
    "get_time": tool("get_time", "Current local time in a city.", {"city": s("City name")}, ["city"]),
    "send_email": tool("send_email", "Send an email from the user's account.",
                       {"to": s("Recipient address"), "subject": s("Subject line"), "body": s("Plain-text body")},
                       ["to", "subject", "body"]),
    "search_recipes": tool("search_recipes", "Search a recipe collection.",
                           {"query": s("Dish or ingredients"), "max_minutes": n("Maximum total time", "integer"),
                            "diet": s("Dietary filter", enum=["none", "vegetarian", "vegan", "gluten-free"])},
                           ["query"]),
}

CITIES = [
    # city, country, typical temps by season (C), conditions, utc offset (hours, winter)
    ("Lisbon", "Portugal", 17, ["sunny", "partly cloudy", "light rain"], 0),
    ("Oslo", "Norway", 4, ["overcast", "light snow", "clear"], 1),
    ("Nairobi", "Kenya", 22, ["partly cloudy", "sunny", "scattered showers"], 3),
    ("Osaka", "Japan", 15, ["clear", "cloudy", "light rain"], 9),
    ("Montreal", "Canada", -3, ["snow showers", "clear", "overcast"], -5),
    ("Buenos Aires", "Argentina", 24, ["sunny", "humid and cloudy", "thunderstorms"], -3),
    ("Cairo", "Egypt", 21, ["sunny", "hazy", "clear"], 2),
    ("Edinburgh", "United Kingdom", 7, ["drizzle", "overcast", "windy"], 0),
    ("Perth", "Australia", 27, ["sunny", "clear", "breezy"], 8),
    ("Denver", "United States", 9, ["clear", "windy", "light snow"], -7),
    ("Hanoi", "Vietnam", 19, ["misty", "overcast", "light rain"], 7),
    ("Krakow", "Poland", 2, ["fog", "overcast", "light snow"], 1),
    ("Valparaiso", "Chile", 18, ["sunny", "morning fog", "clear"], -3),
    ("Marrakesh", "Morocco", 19, ["sunny", "clear", "dusty wind"], 1),
    ("Reykjavik", "Iceland", 1, ["sleet", "windy", "overcast"], 0),
    ("Singapore", "Singapore", 28, ["thunderstorms", "humid and cloudy", "sunny"], 8),
]

RATES_TO_USD = {"USD": 1.0, "EUR": 1.08, "GBP": 1.27, "JPY": 0.0067, "CHF": 1.12, "CAD": 0.74,
                "AUD": 0.66, "SEK": 0.095, "MXN": 0.058, "INR": 0.012, "BRL": 0.20, "PLN": 0.25}
CURRENCY_NAMES = {"USD": "US dollars", "EUR": "euros", "GBP": "pounds", "JPY": "yen", "CHF": "Swiss francs",
                  "CAD": "Canadian dollars", "AUD": "Australian dollars", "SEK": "Swedish kronor",
                  "MXN": "Mexican pesos", "INR": "rupees", "BRL": "reais", "PLN": "zloty"}

AIRPORTS = [("LIS", "Lisbon"), ("AMS", "Amsterdam"), ("FRA", "Frankfurt"), ("MAD", "Madrid"),
            ("CPH", "Copenhagen"), ("ATH", "Athens"), ("DUB", "Dublin"), ("VIE", "Vienna"),
            ("BCN", "Barcelona"), ("ZRH", "Zurich"), ("PRG", "Prague"), ("HEL", "Helsinki")]
AIRLINES = ["Aerolinea Norte", "Blue Heron Air", "Coastline Airways", "Nordic Skylink", "Meridian Jet"]

STOCKS = {"NVLT": ("Novalight Systems", 142.18), "GRNW": ("Greenway Foods", 38.74),
          "QBIT": ("Qubit Logic", 217.05), "HRBR": ("Harbor Freight Lines", 61.90),
          "SOLR": ("Solaris Energy", 23.46), "MEDX": ("Medexa Health", 88.31)}

PEOPLE = ["Amara", "Bastien", "Chen", "Dalia", "Emeka", "Freya", "Gustavo", "Hana", "Ilya", "Jonas",
          "Keiko", "Lucia", "Mateo", "Noor", "Oskar", "Priya", "Rafael", "Sofia", "Tomas", "Yusuf"]

UNIT_FACTORS = {  # to SI base
    ("mile", "km"): 1.609344, ("km", "mile"): 1 / 1.609344, ("pound", "kg"): 0.45359237,
    ("kg", "pound"): 1 / 0.45359237, ("foot", "m"): 0.3048, ("m", "foot"): 1 / 0.3048,
    ("gallon", "liter"): 3.785411784, ("liter", "gallon"): 1 / 3.785411784,
    ("inch", "cm"): 2.54, ("cm", "inch"): 1 / 2.54, ("ounce", "gram"): 28.349523125,
}


def weather_report(rng, city_row, unit="celsius"):
    city, country, base, conds, _ = city_row
    temp_c = base + rng.randint(-4, 4)
    temp = temp_c if unit == "celsius" else round(temp_c * 9 / 5 + 32)
    return {"city": f"{city}, {country}", "temperature": temp, "unit": unit, "condition": rng.choice(conds),
            "humidity_pct": rng.randint(35, 92), "wind_kph": rng.randint(3, 38)}


def tc_weather(rng):
    row = rng.choice(CITIES)
    unit = rng.choice(["celsius", "celsius", "fahrenheit"])
    asks = [f"What's the weather like in {row[0]} right now?",
            f"Is it cold in {row[0]} at the moment? I'm deciding what to pack.",
            f"quick one: current weather {row[0]}" + (" in fahrenheit pls" if unit == "fahrenheit" else ""),
            f"My sister lands in {row[0]} in an hour. How's the weather there?"]
    ask = rng.choice(asks)
    if "fahrenheit" not in ask:
        unit = "celsius"
    c = call(rng, "get_weather", {"city": row[0], "unit": unit})
    w = weather_report(rng, row, unit)
    sym = "°C" if unit == "celsius" else "°F"
    cold = w["temperature"] < (8 if unit == "celsius" else 46)
    advice = ("Pack a warm coat, gloves and something waterproof." if cold else
              "A light jacket should be enough" + (", plus an umbrella." if "rain" in w["condition"] or "shower" in w["condition"] or "storm" in w["condition"] else "."))
    answer = (f"Right now in {w['city']} it's {w['temperature']}{sym} and {w['condition']}, with humidity at "
              f"{w['humidity_pct']}% and wind around {w['wind_kph']} km/h. {advice}")
    return [TOOLS["get_weather"]], [{"role": "user", "content": ask}, assistant_calls([c]), result(c, w),
                                    {"role": "assistant", "content": answer}]


def tc_compare_weather(rng):
    a, b = rng.sample(CITIES, 2)
    ca = call(rng, "get_weather", {"city": a[0], "unit": "celsius"})
    cb = call(rng, "get_weather", {"city": b[0], "unit": "celsius"})
    wa, wb = weather_report(rng, a), weather_report(rng, b)
    diff = wa["temperature"] - wb["temperature"]
    warmer = a[0] if diff > 0 else b[0]
    comp = (f"{warmer} is warmer by {abs(diff)} degrees." if diff else "Both are at the same temperature.")
    ask = rng.choice([f"Which is warmer today, {a[0]} or {b[0]}?",
                      f"Compare the weather in {a[0]} and {b[0]} for me.",
                      f"I'm choosing between {a[0]} and {b[0]} for a weekend away. What's the weather in each right now?"])
    answer = (f"- {wa['city']}: {wa['temperature']}°C, {wa['condition']}, wind {wa['wind_kph']} km/h\n"
              f"- {wb['city']}: {wb['temperature']}°C, {wb['condition']}, wind {wb['wind_kph']} km/h\n\n{comp}")
    return [TOOLS["get_weather"]], [{"role": "user", "content": ask}, assistant_calls([ca, cb]),
                                    result(ca, wa), result(cb, wb), {"role": "assistant", "content": answer}]


def tc_forecast(rng):
    row = rng.choice(CITIES)
    days = rng.randint(3, 5)
    c = call(rng, "get_forecast", {"city": row[0], "days": days})
    names = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
    start = rng.randrange(7)
    daily = []
    for i in range(days):
        hi = row[2] + rng.randint(-2, 6)
        lo = hi - rng.randint(4, 10)
        daily.append({"day": names[(start + i) % 7], "high": hi, "low": lo, "condition": rng.choice(row[3]),
                      "precip_pct": rng.choice([0, 5, 10, 20, 40, 60, 80])})
    wettest = max(daily, key=lambda d: d["precip_pct"])
    driest = min(daily, key=lambda d: (d["precip_pct"], -d["high"]))
    ask = rng.choice([f"Can you get me the {days}-day forecast for {row[0]}? I want to plan a hike.",
                      f"What will the weather do in {row[0]} over the next {days} days?"])
    lines = "\n".join(f"- {d['day']}: {d['low']}-{d['high']}°C, {d['condition']}, {d['precip_pct']}% chance of rain"
                      for d in daily)
    answer = (f"Here's the outlook for {row[0]}:\n\n{lines}\n\n"
              f"{driest['day']} looks best for a hike ({driest['precip_pct']}% chance of rain). "
              + (f"Avoid {wettest['day']}, with a {wettest['precip_pct']}% chance of rain." if wettest['precip_pct'] >= 40
                 else "No day looks particularly wet."))
    return [TOOLS["get_forecast"]], [{"role": "user", "content": ask}, assistant_calls([c]),
                                     result(c, {"city": row[0], "daily": daily}), {"role": "assistant", "content": answer}]


def tc_currency(rng):
    src, dst = rng.sample(sorted(RATES_TO_USD), 2)
    amount = rng.choice([25, 40, 120, 250, 380, 999, 1500, 2750, 12000, 48.5, 86.2])
    if src == "JPY":
        amount *= 100
    rate = RATES_TO_USD[src] / RATES_TO_USD[dst]
    value = round(amount * rate, 2)
    c = call(rng, "convert_currency", {"amount": amount, "from": src, "to": dst})
    res = {"amount": amount, "from": src, "to": dst, "rate": round(rate, 6), "result": value, "as_of": "2025-01-14"}
    ask = rng.choice([f"How much is {amount:g} {CURRENCY_NAMES[src]} in {CURRENCY_NAMES[dst]}?",
                      f"convert {amount:g} {src} to {dst}",
                      f"I was quoted {amount:g} {src} for a rental. What's that in {dst}?"])
    answer = (f"{fmt_money(amount, src)} is about {fmt_money(value, dst)} at today's rate "
              f"(1 {src} = {rate:.4f} {dst}, as of 14 January 2025). Card providers usually add a fee of 1-3% on top.")
    return [TOOLS["convert_currency"]], [{"role": "user", "content": ask}, assistant_calls([c]), result(c, res),
                                         {"role": "assistant", "content": answer}]


def tc_flights(rng):
    (o, oname), (d, dname) = rng.sample(AIRPORTS, 2)
    day = rng.randint(3, 27)
    month = rng.choice([2, 3, 4, 5, 6])
    date = f"2025-{month:02d}-{day:02d}"
    pax = rng.choice([1, 1, 2, 3])
    c = call(rng, "search_flights", {"origin": o, "destination": d, "date": date, "passengers": pax})
    flights = []
    for _ in range(rng.randint(2, 4)):
        dep_h = rng.randint(6, 20)
        dur = rng.randint(90, 260)
        stops = rng.choice([0, 0, 1])
        if stops:
            dur += rng.randint(60, 150)
        arr = dep_h * 60 + rng.choice([0, 15, 30, 45]) + dur
        price = rng.randint(60, 420) + (40 if stops == 0 else 0)
        flights.append({"flight": f"{rng.choice('ABCDNM')}{rng.choice('XYZKLQ')}{rng.randint(100, 989)}",
                        "airline": rng.choice(AIRLINES), "depart": f"{dep_h:02d}:{(arr - dur) % 60:02d}",
                        "arrive": f"{(arr // 60) % 24:02d}:{arr % 60:02d}", "stops": stops,
                        "duration_min": dur, "price_per_person_eur": price})
    cheapest = min(flights, key=lambda f: f["price_per_person_eur"])
    fastest = min(flights, key=lambda f: f["duration_min"])
    ask = rng.choice([f"Find me flights from {oname} to {dname} on {date}" + (f" for {pax} people" if pax > 1 else "") + ".",
                      f"Any flights {o} -> {d} on {date}? {'Just me.' if pax == 1 else f'We are {pax}.'}"])
    lines = "\n".join(f"- {f['flight']} ({f['airline']}): {f['depart']} -> {f['arrive']}, "
                      f"{'direct' if f['stops'] == 0 else '1 stop'}, {f['duration_min'] // 60}h{f['duration_min'] % 60:02d}, "
                      f"{f['price_per_person_eur']} EUR per person" for f in flights)
    total = cheapest["price_per_person_eur"] * pax
    tail = (f"The cheapest is {cheapest['flight']} at {cheapest['price_per_person_eur']} EUR per person"
            + (f" ({total} EUR for {pax})" if pax > 1 else "") + ". ")
    tail += ("It's also the fastest." if cheapest is fastest else
             f"The fastest is {fastest['flight']} at {fastest['duration_min'] // 60}h{fastest['duration_min'] % 60:02d}.")
    return [TOOLS["search_flights"]], [{"role": "user", "content": ask}, assistant_calls([c]),
                                       result(c, {"results": flights}),
                                       {"role": "assistant", "content": f"I found {len(flights)} options on {date}:\n\n{lines}\n\n{tail}"}]


def tc_calendar(rng):
    who = rng.sample(PEOPLE, rng.randint(1, 3))
    topic = rng.choice(["quarterly budget review", "design critique", "onboarding check-in", "incident retro",
                        "roadmap planning", "vendor call", "1:1", "hiring debrief"])
    day = rng.randint(10, 28)
    hour = rng.choice([9, 10, 11, 13, 14, 15, 16])
    mins = rng.choice([30, 45, 60, 90])
    start = f"2025-03-{day:02d}T{hour:02d}:00"
    end_total = hour * 60 + mins
    end = f"2025-03-{day:02d}T{end_total // 60:02d}:{end_total % 60:02d}"
    emails = [f"{p.lower()}@example.org" for p in who]
    c = call(rng, "create_event", {"title": topic.capitalize(), "start": start, "end": end, "attendees": emails})
    res = {"event_id": f"evt_{rng.randint(100000, 999999)}", "status": "created", "invites_sent": len(emails)}
    names = ", ".join(who[:-1]) + (" and " if len(who) > 1 else "") + who[-1]
    ask = rng.choice([f"Put a {mins}-minute {topic} on my calendar for March {day} at {hour}:00 with {names}.",
                      f"schedule {topic} w/ {names}, march {day}, {hour if hour <= 12 else hour - 12}{'am' if hour < 12 else 'pm'}, {mins} min"])
    answer = (f"Done. \"{topic.capitalize()}\" is on your calendar for March {day}, {hour:02d}:00-"
              f"{end_total // 60:02d}:{end_total % 60:02d}, and invitations went to {names}.")
    return [TOOLS["create_event"]], [{"role": "user", "content": ask}, assistant_calls([c]), result(c, res),
                                     {"role": "assistant", "content": answer}]


def tc_stock(rng):
    sym = rng.choice(sorted(STOCKS))
    name, base = STOCKS[sym]
    change = round(rng.uniform(-4.5, 4.5), 2)
    price = round(base * (1 + change / 100), 2)
    c = call(rng, "get_stock_quote", {"symbol": sym})
    res = {"symbol": sym, "name": name, "price": price, "currency": "USD", "change_pct": change,
           "previous_close": base, "market": "closed" if rng.random() < 0.3 else "open"}
    ask = rng.choice([f"How is {sym} doing today?", f"price of {name} stock?", f"What's {sym} trading at?"])
    direction = "up" if change > 0 else "down"
    answer = (f"{name} ({sym}) is at ${price:.2f}, {direction} {abs(change):.2f}% from yesterday's close of ${base:.2f}."
              + (" The market is closed, so that's the last traded price." if res["market"] == "closed" else ""))
    return [TOOLS["get_stock_quote"]], [{"role": "user", "content": ask}, assistant_calls([c]), result(c, res),
                                        {"role": "assistant", "content": answer}]


ORDER_STATES = [
    ("shipped", "Your order shipped on {d1} with {carrier}, tracking number {trk}. Expected delivery is {d2}."),
    ("processing", "Your order is still being packed; it should ship by {d2}. I can notify you when it leaves the warehouse."),
    ("delivered", "The carrier marked it as delivered on {d2}. If you can't find it, check with neighbours or the building's mail room; after 48 hours I can open a lost-parcel claim."),
    ("delayed", "There's a delay: one item ({item}) is back-ordered until {d2}. You can wait, or I can ship the rest now and the missing item separately."),
]


def tc_order(rng):
    oid = f"A-{rng.randint(10000, 99999)}"
    state, template = rng.choice(ORDER_STATES)
    item = rng.choice(["ceramic pour-over kettle", "trail running shoes (EU 42)", "USB-C dock", "linen duvet cover",
                       "cast iron skillet", "wool hiking socks, 3-pack", "mechanical keyboard"])
    carrier = rng.choice(["DHL", "UPS", "PostNL", "Colissimo", "GLS"])
    trk = "".join(rng.choice(string.digits) for _ in range(12))
    d1, d2 = f"January {rng.randint(3, 12)}", f"January {rng.randint(14, 24)}"
    c = call(rng, "lookup_order", {"order_id": oid})
    res = {"order_id": oid, "status": state, "items": [item], "carrier": carrier if state != "processing" else None,
           "tracking": trk if state in ("shipped", "delivered") else None, "eta": d2}
    ask = rng.choice([f"Where is my order {oid}?", f"hi, order {oid} hasn't arrived yet, what's going on",
                      f"Can you check the status of {oid}? It's the {item}."])
    answer = template.format(d1=d1, d2=d2, carrier=carrier, trk=trk, item=item)
    return [TOOLS["lookup_order"]], [{"role": "user", "content": ask}, assistant_calls([c]), result(c, res),
                                     {"role": "assistant", "content": answer}]


def tc_order_missing_id(rng):
    item = rng.choice(["blender", "desk lamp", "rain jacket", "set of knives"])
    oid = f"A-{rng.randint(10000, 99999)}"
    c = call(rng, "lookup_order", {"order_id": oid})
    res = {"order_id": oid, "status": "shipped", "items": [item], "carrier": "GLS",
           "tracking": "".join(rng.choice(string.digits) for _ in range(11)), "eta": "January 21"}
    return [TOOLS["lookup_order"]], [
        {"role": "user", "content": f"My {item} still hasn't shown up."},
        {"role": "assistant", "content": "Sorry about that. Could you give me the order number? It starts with \"A-\" and is in your confirmation email."},
        {"role": "user", "content": f"oh right, it's {oid}"},
        assistant_calls([c]), result(c, res),
        {"role": "assistant", "content": f"Thanks. Order {oid} shipped with GLS (tracking {res['tracking']}) and is due on January 21. "
                                         "If it hasn't arrived by then, tell me and I'll chase the carrier."}]


def tc_calc(rng):
    kind = rng.randrange(4)
    if kind == 0:
        price, qty, tax = rng.choice([12.5, 19.99, 7.25, 48.0]), rng.randint(3, 40), rng.choice([5, 7.5, 8, 20, 21])
        expr = f"{price} * {qty} * (1 + {tax}/100)"
        val = price * qty * (1 + tax / 100)
        ask = f"I'm buying {qty} units at ${price} each and sales tax is {tax}%. What's the total?"
        ans = f"The total is ${val:,.2f}: {qty} x ${price} = ${price * qty:,.2f}, plus {tax}% tax (${price * qty * tax / 100:,.2f})."
    elif kind == 1:
        a, b = rng.randint(1200, 9800), rng.randint(13, 97)
        expr = f"{a} / {b}"
        val = a / b
        ask = f"Split a bill of {a} among {b} people, how much each?"
        ans = f"Each person pays about {val:,.2f} ({a} / {b} = {val:.4f})."
    elif kind == 2:
        p, r, y = rng.choice([5000, 12000, 25000]), rng.choice([3, 4.5, 6, 7.2]), rng.randint(3, 15)
        expr = f"{p} * (1 + {r}/100) ** {y}"
        val = p * (1 + r / 100) ** y
        ask = f"If I invest {p} at {r}% a year compounded yearly, what do I have after {y} years?"
        ans = f"After {y} years you'd have about {val:,.2f}, so {val - p:,.2f} in interest."
    else:
        w, h = rng.randint(3, 9) + 0.5, rng.randint(2, 6) + 0.25
        coats = rng.choice([1, 2])
        expr = f"{w} * {h} * {coats} / 10"
        val = w * h * coats / 10
        ask = f"My wall is {w} m by {h} m. Paint covers 10 square metres per litre and I need {coats} coat{'s' if coats > 1 else ''}. How many litres?"
        ans = f"You need about {val:.2f} litres ({w * h:.2f} m² x {coats} coat{'s' if coats > 1 else ''} / 10). Buy a little extra for touch-ups: {math.ceil(val * 1.1)} litres is safe."
    c = call(rng, "calculate", {"expression": expr})
    return [TOOLS["calculate"]], [{"role": "user", "content": ask}, assistant_calls([c]),
                                  result(c, {"expression": expr, "result": round(val, 6)}),
                                  {"role": "assistant", "content": ans}]


def tc_units(rng):
    (fu, tu), factor = rng.choice(sorted(UNIT_FACTORS.items()))
    value = rng.choice([1, 3, 5.5, 12, 26.2, 42, 70, 150, 500])
    out = value * factor
    c = call(rng, "convert_units", {"value": value, "from_unit": fu, "to_unit": tu})
    ask = rng.choice([f"How many {tu}s is {value:g} {fu}s?", f"convert {value:g} {fu} to {tu}",
                      f"The recipe/spec says {value:g} {fu}. What is that in {tu}?"])
    return [TOOLS["convert_units"]], [{"role": "user", "content": ask}, assistant_calls([c]),
                                      result(c, {"value": value, "from_unit": fu, "to_unit": tu, "result": round(out, 4)}),
                                      {"role": "assistant", "content": f"{value:g} {fu} is {out:,.2f} {tu}."}]


def tc_time(rng):
    a, b = rng.sample(CITIES, 2)
    base_h = rng.randint(0, 23)
    ha, hb = (base_h + a[4]) % 24, (base_h + b[4]) % 24
    ca, cb = call(rng, "get_time", {"city": a[0]}), call(rng, "get_time", {"city": b[0]})
    diff = b[4] - a[4]
    ask = f"I'm in {a[0]}. If I call my colleague in {b[0]} now, what time is it for them?"
    rel = "ahead of" if diff > 0 else "behind"
    answer = (f"It's {ha:02d}:{(base_h * 7) % 60:02d} in {a[0]} and {hb:02d}:{(base_h * 7) % 60:02d} in {b[0]}; "
              + (f"{b[0]} is {abs(diff)} hour{'s' if abs(diff) != 1 else ''} {rel} you." if diff else "you're in the same time zone.")
              + (" That's outside normal working hours there, so maybe send a message instead." if hb < 8 or hb >= 19 else ""))
    return [TOOLS["get_time"]], [{"role": "user", "content": ask}, assistant_calls([ca, cb]),
                                 result(ca, {"city": a[0], "local_time": f"{ha:02d}:{(base_h * 7) % 60:02d}", "utc_offset": a[4]}),
                                 result(cb, {"city": b[0], "local_time": f"{hb:02d}:{(base_h * 7) % 60:02d}", "utc_offset": b[4]}),
                                 {"role": "assistant", "content": answer}]


def tc_email_after_lookup(rng):
    who = rng.choice(PEOPLE)
    row = rng.choice(CITIES)
    w = weather_report(rng, row)
    c1 = call(rng, "get_weather", {"city": row[0], "unit": "celsius"})
    body = (f"Hi {who},\n\nQuick heads-up for tomorrow's site visit in {row[0]}: it's currently {w['temperature']}°C and "
            f"{w['condition']}, so bring layers.\n\nSee you there!")
    c2 = call(rng, "send_email", {"to": f"{who.lower()}@example.org", "subject": f"Weather for the {row[0]} visit", "body": body})
    return [TOOLS["get_weather"], TOOLS["send_email"]], [
        {"role": "user", "content": f"Check the weather in {row[0]} and email {who} ({who.lower()}@example.org) a heads-up about it for tomorrow's site visit."},
        assistant_calls([c1]), result(c1, w), assistant_calls([c2]),
        result(c2, {"message_id": f"<{rng.randint(10**7, 10**8)}@mail.example.org>", "status": "sent"}),
        {"role": "assistant", "content": f"Sent. {who} now knows it's {w['temperature']}°C and {w['condition']} in {row[0]}."}]


def tc_error_retry(rng):
    row = rng.choice(CITIES)
    bad = row[0].lower().replace("a", "", 1)
    c1 = call(rng, "get_weather", {"city": bad})
    c2 = call(rng, "get_weather", {"city": f"{row[0]}, {row[1]}"})
    w = weather_report(rng, row)
    return [TOOLS["get_weather"]], [
        {"role": "user", "content": f"weather in {bad}?"}, assistant_calls([c1]),
        result(c1, {"error": "city_not_found", "message": f"No city matches '{bad}'", "suggestions": [f"{row[0]}, {row[1]}"]}),
        assistant_calls([c2]), result(c2, w),
        {"role": "assistant", "content": f"I couldn't find \"{bad}\", so I used {row[0]}, {row[1]}: it's {w['temperature']}°C and {w['condition']} there. Tell me if you meant somewhere else."}]


def tc_no_tool_needed(rng):
    q, a = rng.choice([
        ("What does the convert_currency tool do exactly?", "It converts an amount from one currency to another using the day's exchange rate and returns the rate it used and the date of that rate. Give me an amount and two currencies and I'll run it."),
        ("Thanks, that's all!", "You're welcome. Have a good trip!"),
        ("Can you book the flight for me too?", "I can search flights, but I don't have a booking tool, so I can't buy the ticket. The airline's site or a travel agent can book it using the flight number I found."),
        ("What's 2 + 2?", "4. (For anything longer than that, I can use the calculator tool to make sure the arithmetic is exact.)"),
    ])
    first = tc_currency(rng)
    return first[0], first[1] + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def tc_recipes(rng):
    dish = rng.choice(["chickpea curry", "mushroom risotto", "shakshuka", "lentil soup", "vegetable stir-fry",
                       "lemon pasta", "black bean tacos"])
    minutes = rng.choice([20, 30, 45])
    diet = rng.choice(["vegetarian", "vegan", "none", "gluten-free"])
    c = call(rng, "search_recipes", {"query": dish, "max_minutes": minutes, "diet": diet})
    hits = []
    for i in range(rng.randint(2, 3)):
        t = rng.randint(minutes // 2, minutes)
        hits.append({"title": f"{rng.choice(['Weeknight', 'Simple', 'One-pot', 'Smoky', 'Bright'])} {dish}",
                     "total_minutes": t, "servings": rng.choice([2, 4]), "rating": round(rng.uniform(3.8, 4.9), 1)})
    best = max(hits, key=lambda h: h["rating"])
    diet_txt = "" if diet == "none" else f" {diet}"
    return [TOOLS["search_recipes"]], [
        {"role": "user", "content": f"I want to make{diet_txt} {dish} tonight, {minutes} minutes max."},
        assistant_calls([c]), result(c, {"results": hits}),
        {"role": "assistant", "content": "Options that fit:\n\n" + "\n".join(
            f"- {h['title']}: {h['total_minutes']} min, serves {h['servings']}, rated {h['rating']}" for h in hits)
            + f"\n\nThe best rated is \"{best['title']}\" ({best['rating']}). Want the ingredient list?"}]


TOOL_SCENARIOS = [tc_weather, tc_compare_weather, tc_forecast, tc_currency, tc_flights, tc_calendar, tc_stock,
                  tc_order, tc_order_missing_id, tc_calc, tc_units, tc_time, tc_email_after_lookup,
                  tc_error_retry, tc_no_tool_needed, tc_recipes]
SYSTEMS = [
    "You are a helpful assistant with access to tools. Call a tool when it gives a better answer than your own knowledge.",
    "You are Ada, a concise assistant. Use the provided functions for live data and never invent tool results.",
    "You help users with travel, money and scheduling questions. Prefer tools for anything that changes over time.",
    None,
]


def gen_tool_calling(rng: random.Random, count: int) -> list[dict]:
    out = []
    for i in range(count):
        scenario = TOOL_SCENARIOS[i % len(TOOL_SCENARIOS)]
        tools, messages = scenario(rng)
        system = rng.choice(SYSTEMS)
        if system:
            messages = [{"role": "system", "content": system}] + messages
        out.append({"messages": messages, "tools": tools})
    return out


# =============================================================================== agentic traces

AGENT_SYSTEM = ("You are an autonomous software agent working in a sandbox. Think step by step: state a short plan, "
                "call one tool at a time, read each result carefully, and finish with a summary of what you did "
                "and what the user should check.")

CODE_TOOLS = [
    tool("list_files", "List files under a directory of the repository.", {"path": s("Directory, relative to the repo root")}, ["path"]),
    tool("read_file", "Read a text file from the repository.", {"path": s("File path")}, ["path"]),
    tool("run_tests", "Run the test suite (or a subset) and return the output.", {"selector": s("pytest node id or path; empty for all")}, []),
    tool("apply_patch", "Replace an exact snippet of a file with new text.",
         {"path": s("File path"), "old": s("Exact text to replace"), "new": s("Replacement text")}, ["path", "old", "new"]),
]

BUGS = [
    {
        "module": "billing/pagination.py", "test": "tests/test_pagination.py::test_last_page_has_remaining_items",
        "symptom": "the last page of invoices is always empty",
        "code": "def page_count(total: int, per_page: int) -> int:\n    return total // per_page\n\n\ndef page(items: list, number: int, per_page: int) -> list:\n    start = (number - 1) * per_page\n    return items[start:start + per_page]\n",
        "old": "    return total // per_page\n", "new": "    return -(-total // per_page)  # ceiling division: a partial last page still counts\n",
        "failure": "AssertionError: assert 4 == 5\n +  where 4 = page_count(47, 10)",
        "explain": "page_count used floor division, so 47 items at 10 per page gave 4 pages and the 7 remaining invoices were never shown",
    },
    {
        "module": "accounts/names.py", "test": "tests/test_names.py::test_duplicate_check_ignores_case",
        "symptom": "users can register 'Alice' and 'alice' as two different accounts",
        "code": "def is_taken(username: str, existing: set[str]) -> bool:\n    return username in existing\n",
        "old": "    return username in existing\n", "new": "    wanted = username.casefold()\n    return any(name.casefold() == wanted for name in existing)\n",
        "failure": "AssertionError: assert False is True\n +  where False = is_taken('Alice', {'alice', 'bob'})",
        "explain": "the duplicate check compared names exactly, so a different capitalisation slipped through; it now compares casefolded names",
    },
    {
        "module": "reports/money.py", "test": "tests/test_money.py::test_rounds_half_up",
        "symptom": "invoice totals are sometimes one cent lower than the accounting system's",
        "code": "def to_cents(amount: float) -> int:\n    return round(amount * 100)\n",
        "old": "def to_cents(amount: float) -> int:\n    return round(amount * 100)\n",
        "new": "from decimal import ROUND_HALF_UP, Decimal\n\n\ndef to_cents(amount: str | Decimal) -> int:\n    value = Decimal(str(amount)) * 100\n    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))\n",
        "failure": "AssertionError: assert 1002 == 1003\n +  where 1002 = to_cents(10.025)",
        "explain": "Python's round() uses banker's rounding on an inexact float, so 10.025 became 1002 cents; Decimal with ROUND_HALF_UP gives the 1003 accounting expects",
    },
    {
        "module": "scheduler/windows.py", "test": "tests/test_windows.py::test_window_includes_end_hour",
        "symptom": "jobs scheduled for 17:00 never run even though the window is 09:00-17:00",
        "code": "def in_window(hour: int, start: int, end: int) -> bool:\n    return start <= hour < end\n",
        "old": "    return start <= hour < end\n", "new": "    return start <= hour <= end  # the window's end hour is inclusive, as documented\n",
        "failure": "AssertionError: assert False\n +  where False = in_window(17, 9, 17)",
        "explain": "the window check excluded its end hour although the docstring and the UI call the end inclusive",
    },
    {
        "module": "importer/csv_rows.py", "test": "tests/test_csv_rows.py::test_blank_trailing_line",
        "symptom": "importing a CSV exported from a spreadsheet crashes with IndexError",
        "code": "def parse(text: str) -> list[tuple[str, int]]:\n    rows = []\n    for line in text.split('\\n')[1:]:\n        name, qty = line.split(',')\n        rows.append((name.strip(), int(qty)))\n    return rows\n",
        "old": "    for line in text.split('\\n')[1:]:\n", "new": "    for line in text.splitlines()[1:]:\n        if not line.strip():\n            continue  # spreadsheets end files with a blank line\n",
        "failure": "ValueError: not enough values to unpack (expected 2, got 1)",
        "explain": "the exported file ends with a blank line, which the parser tried to split into two fields; blank lines are now skipped",
    },
    {
        "module": "cache/ttl.py", "test": "tests/test_ttl.py::test_entry_expires",
        "symptom": "cached exchange rates never refresh",
        "code": "import time\n\n\nclass TTLCache:\n    def __init__(self, seconds: float):\n        self.seconds = seconds\n        self.data = {}\n\n    def get(self, key):\n        value, stored = self.data.get(key, (None, 0))\n        if time.time() - stored > self.seconds * 1000:\n            return None\n        return value\n",
        "old": "        if time.time() - stored > self.seconds * 1000:\n", "new": "        if time.time() - stored > self.seconds:  # time.time() is already in seconds\n",
        "failure": "AssertionError: assert 1.08 is None",
        "explain": "the expiry compared seconds with milliseconds, so a 60-second TTL behaved like 16 hours",
    },
]

RESEARCH = [
    {"q": "Which uses less energy per kilometre for a 500 km trip: a high-speed train or a short-haul flight?",
     "queries": ["high speed rail energy per passenger km", "short haul flight energy per passenger km"],
     "pages": [("rail-efficiency-review", "High-speed trains in Europe use roughly 0.1 to 0.2 kWh of electricity per passenger-kilometre at typical occupancy."),
               ("aviation-fuel-factsheet", "Short-haul jets burn about 3 to 4 litres of kerosene per 100 passenger-km, about 0.3 to 0.4 kWh of fuel energy per passenger-km.")],
     "answer": "The train, by a wide margin: roughly 0.1-0.2 kWh per passenger-km against 0.3-0.4 kWh for a short-haul jet, so two to four times less energy for the same trip, before counting the airport transfers."},
    {"q": "How long does it take for a typical lithium-ion phone battery to lose 20% of its capacity?",
     "queries": ["lithium ion phone battery capacity loss cycles", "phone battery 80 percent capacity cycles"],
     "pages": [("battery-ageing-notes", "Most phone makers rate their batteries to keep about 80% of capacity after 500 to 1000 full charge cycles."),
               ("charging-habits", "Heat and long periods at 100% charge speed up ageing; partial charges count as fractions of a cycle.")],
     "answer": "Typically 500-1000 full charge cycles, which for one full cycle a day is about one and a half to three years. Heat and keeping the phone at 100% for long periods shorten that."},
    {"q": "What's the difference between a crocodile and an alligator that a tourist could actually see?",
     "queries": ["crocodile vs alligator snout shape", "crocodile alligator teeth visible closed mouth"],
     "pages": [("reptile-guide", "Alligators have a wide, U-shaped snout; most crocodiles have a narrower, V-shaped one."),
               ("field-identification", "With the mouth closed, a crocodile's large fourth lower tooth stays visible; an alligator's upper jaw hides its lower teeth.")],
     "answer": "Look at the snout and the teeth: alligators have a broad U-shaped snout and, with the mouth shut, mostly only upper teeth show; crocodiles have a narrower V-shaped snout and a visible fourth lower tooth sticking up when the mouth is closed."},
]

RESEARCH_TOOLS = [
    tool("search_web", "Search the web and return result titles and ids.", {"query": s("Search query")}, ["query"]),
    tool("open_page", "Open a search result by id and return its text.", {"id": s("Result id from search_web")}, ["id"]),
]

DATA_TOOLS = [
    tool("run_sql", "Run a read-only SQL query against the analytics database.", {"query": s("SQL query")}, ["query"]),
    tool("write_file", "Write a text file into the shared reports folder.", {"path": s("File name"), "content": s("File content")}, ["path", "content"]),
]

REGIONS = ["North", "South", "East", "West", "Central"]
PRODUCTS = ["Basic plan", "Pro plan", "Team plan", "Add-on storage"]

OPS_TOOLS = [
    tool("service_status", "Health and basic metrics of a service.", {"service": s("Service name")}, ["service"]),
    tool("read_logs", "Last lines of a service's log.", {"service": s("Service name"), "lines": n("How many lines", "integer")}, ["service"]),
    tool("restart_service", "Restart a service (rolling, no downtime).", {"service": s("Service name")}, ["service"]),
    tool("disk_usage", "Disk usage of a host's mounted volumes.", {"host": s("Host name")}, ["host"]),
    tool("delete_old_files", "Delete files older than N days in a directory on a host.",
         {"host": s("Host name"), "path": s("Directory"), "days": n("Age threshold in days", "integer")}, ["host", "path", "days"]),
]

SUPPORT_TOOLS = [
    TOOLS["lookup_order"],
    tool("check_stock", "Stock level for a product SKU in each warehouse.", {"sku": s("Product SKU")}, ["sku"]),
    tool("create_replacement", "Create a free replacement shipment for an order line.",
         {"order_id": s("Order number"), "sku": s("SKU to replace"), "warehouse": s("Warehouse code")}, ["order_id", "sku", "warehouse"]),
    tool("issue_refund", "Refund an order line to the original payment method.",
         {"order_id": s("Order number"), "amount": n("Amount in EUR"), "reason": s("Reason")}, ["order_id", "amount", "reason"]),
    TOOLS["send_email"],
]


def ag_fix_bug(rng):
    bug = rng.choice(BUGS)
    folder = bug["module"].split("/")[0]
    test_path = bug["test"].split("::")[0]
    other = rng.sample(["__init__.py", "models.py", "service.py", "settings.py", "utils.py"], 3)
    c1 = call(rng, "run_tests", {"selector": ""})
    n_pass = rng.randint(40, 180)
    t1 = (f"============ 1 failed, {n_pass} passed in {rng.uniform(1.5, 9):.2f}s ============\n"
          f"FAILED {bug['test']} - {bug['failure'].splitlines()[0]}")
    c2 = call(rng, "list_files", {"path": folder})
    files = sorted(other + [bug["module"].split("/")[1]])
    c3 = call(rng, "read_file", {"path": bug["module"]})
    c4 = call(rng, "apply_patch", {"path": bug["module"], "old": bug["old"], "new": bug["new"]})
    c5 = call(rng, "run_tests", {"selector": test_path})
    c6 = call(rng, "run_tests", {"selector": ""})
    user = rng.choice([f"Bug report from support: {bug['symptom']}. Can you find and fix it?",
                       f"{bug['symptom'].capitalize()}. Please investigate and patch it; CI must stay green.",
                       f"Customers say {bug['symptom']}. Fix it please."])
    msgs = [
        {"role": "system", "content": AGENT_SYSTEM},
        {"role": "user", "content": user},
        assistant_calls([c1], "Plan:\n1. Run the test suite to see what fails.\n2. Find the code behind the failure.\n3. Patch it, rerun the failing test, then the whole suite."),
        result(c1, t1),
        assistant_calls([c2], f"One failure, in {test_path}:\n{bug['failure']}\nThat matches the report. Next: look at the {folder} package."),
        result(c2, {"path": folder, "files": files}),
        assistant_calls([c3], f"The logic should be in {bug['module']}. Reading it."),
        result(c3, bug["code"]),
        assistant_calls([c4], f"Found it: {bug['explain']}. Applying a minimal patch."),
        result(c4, {"status": "ok", "path": bug["module"], "replacements": 1}),
        assistant_calls([c5], "Rerunning the failing test first."),
        result(c5, f"============ {rng.randint(3, 9)} passed in 0.{rng.randint(10, 99)}s ============"),
        assistant_calls([c6], "It passes. Now the full suite, to make sure nothing else depended on the old behaviour."),
        result(c6, f"============ {n_pass + 1} passed in {rng.uniform(1.5, 9):.2f}s ============"),
        {"role": "assistant", "content": f"Fixed. Cause: {bug['explain']}.\n\nChange: one edit in `{bug['module']}`. "
                                         f"Tests: `{bug['test']}` now passes and the full suite is green ({n_pass + 1} passed).\n\n"
                                         "Worth checking: any stored data produced while the bug was live."},
    ]
    return CODE_TOOLS, msgs


def ag_research(rng):
    item = rng.choice(RESEARCH)
    msgs = [{"role": "system", "content": AGENT_SYSTEM}, {"role": "user", "content": item["q"]}]
    plan = "Plan:\n1. Search for each side of the comparison.\n2. Open the most relevant sources.\n3. Compare the figures and answer with the range, not a single made-up number."
    for i, (query, (page_id, text)) in enumerate(zip(item["queries"], item["pages"])):
        cs = call(rng, "search_web", {"query": query})
        results = [{"id": page_id, "title": page_id.replace("-", " ").title()},
                   {"id": f"forum-{rng.randint(100, 999)}", "title": f"Thread: {query}?"}]
        msgs += [assistant_calls([cs], plan if i == 0 else "Now the second half of the question."), result(cs, {"results": results})]
        co = call(rng, "open_page", {"id": page_id})
        msgs += [assistant_calls([co], f"'{results[0]['title']}' looks like a primary source; the forum thread is less reliable. Opening it."),
                 result(co, text)]
    msgs.append({"role": "assistant", "content": item["answer"] + "\n\nSources: " + ", ".join(p for p, _ in item["pages"]) + "."})
    return RESEARCH_TOOLS, msgs


def ag_data_report(rng):
    quarter = rng.choice(["Q1", "Q2", "Q3", "Q4"])
    rows = []
    for region in REGIONS:
        rows.append({"region": region, "revenue": rng.randint(80, 420) * 1000, "customers": rng.randint(150, 1900)})
    total = sum(r["revenue"] for r in rows)
    top = max(rows, key=lambda r: r["revenue"])
    low = min(rows, key=lambda r: r["revenue"])
    prod_rows = [{"product": p, "revenue": v} for p, v in zip(PRODUCTS, _split(rng, total, len(PRODUCTS)))]
    best_prod = max(prod_rows, key=lambda r: r["revenue"])
    c1 = call(rng, "run_sql", {"query": "SELECT table_name FROM information_schema.tables WHERE table_schema = 'sales'"})
    c2 = call(rng, "run_sql", {"query": f"SELECT region, SUM(amount) AS revenue, COUNT(DISTINCT customer_id) AS customers FROM sales.orders WHERE quarter = '2024-{quarter}' GROUP BY region ORDER BY revenue DESC"})
    c3 = call(rng, "run_sql", {"query": f"SELECT p.name AS product, SUM(o.amount) AS revenue FROM sales.orders o JOIN sales.products p ON p.id = o.product_id WHERE o.quarter = '2024-{quarter}' GROUP BY p.name ORDER BY revenue DESC"})
    rows_sorted = sorted(rows, key=lambda r: -r["revenue"])
    report = (f"# Sales report 2024-{quarter}\n\nTotal revenue: {total:,} EUR\n\n| Region | Revenue (EUR) | Share | Customers | Revenue per customer |\n|---|---:|---:|---:|---:|\n"
              + "\n".join(f"| {r['region']} | {r['revenue']:,} | {100 * r['revenue'] / total:.1f}% | {r['customers']} | {r['revenue'] / r['customers']:,.0f} |" for r in rows_sorted)
              + f"\n\nBest product: {best_prod['product']} ({best_prod['revenue']:,} EUR).\n")
    c4 = call(rng, "write_file", {"path": f"sales-2024-{quarter}.md", "content": report})
    msgs = [
        {"role": "system", "content": AGENT_SYSTEM},
        {"role": "user", "content": f"Make me a short sales report for 2024 {quarter}: revenue by region with shares, and the best-selling product. Save it as markdown."},
        assistant_calls([c1], "Plan:\n1. Check which tables exist.\n2. Aggregate revenue by region.\n3. Aggregate revenue by product.\n4. Compute shares and write the markdown file."),
        result(c1, {"rows": [{"table_name": "orders"}, {"table_name": "products"}, {"table_name": "customers"}]}),
        assistant_calls([c2], "orders and products are what I need. Revenue by region first."),
        result(c2, {"rows": rows_sorted}),
        assistant_calls([c3], f"Total is {total:,} EUR; {top['region']} leads with {100 * top['revenue'] / total:.1f}%. Now by product."),
        result(c3, {"rows": sorted(prod_rows, key=lambda r: -r["revenue"])}),
        assistant_calls([c4], "The product totals add up to the same revenue, so the two queries agree. Writing the report."),
        result(c4, {"status": "written", "path": f"reports/sales-2024-{quarter}.md", "bytes": len(report.encode())}),
        {"role": "assistant", "content": f"Saved `reports/sales-2024-{quarter}.md`.\n\nHighlights: total revenue {total:,} EUR; "
                                         f"{top['region']} is the largest region ({100 * top['revenue'] / total:.1f}%), {low['region']} the smallest "
                                         f"({100 * low['revenue'] / total:.1f}%); the best seller is {best_prod['product']}."},
    ]
    return DATA_TOOLS, msgs


def _split(rng, total: int, parts: int) -> list[int]:
    weights = [rng.uniform(1, 5) for _ in range(parts)]
    raw = [int(total * w / sum(weights)) for w in weights]
    raw[0] += total - sum(raw)
    return raw


def ag_ops(rng):
    svc = rng.choice(["checkout-api", "search-indexer", "auth-gateway", "report-worker", "image-resizer"])
    host = f"{svc.split('-')[0]}-{rng.randint(1, 4):02d}"
    used = rng.randint(94, 99)
    freed = rng.randint(18, 40)
    days = rng.choice([7, 14, 30])
    c1 = call(rng, "service_status", {"service": svc})
    c2 = call(rng, "read_logs", {"service": svc, "lines": 5})
    c3 = call(rng, "disk_usage", {"host": host})
    c4 = call(rng, "delete_old_files", {"host": host, "path": f"/var/log/{svc}", "days": days})
    c5 = call(rng, "restart_service", {"service": svc})
    c6 = call(rng, "service_status", {"service": svc})
    logs = (f"2025-01-14T03:12:09Z ERROR write failed: No space left on device (path=/var/log/{svc}/app.log)\n"
            f"2025-01-14T03:12:09Z WARN  request queue at 100% capacity\n"
            f"2025-01-14T03:12:10Z ERROR health check handler timed out after 5000ms\n"
            f"2025-01-14T03:12:11Z ERROR write failed: No space left on device (path=/var/lib/{svc}/tmp)\n"
            f"2025-01-14T03:12:13Z WARN  dropping metrics batch (size=512)")
    msgs = [
        {"role": "system", "content": AGENT_SYSTEM + " You may restart services and delete logs older than 7 days without asking; anything else needs approval."},
        {"role": "user", "content": f"Pager says {svc} is unhealthy. Please look into it."},
        assistant_calls([c1], "Plan: check the service's status, read recent logs, fix the cause if it's within what I'm allowed to do, and verify."),
        result(c1, {"service": svc, "healthy": False, "instances": 3, "healthy_instances": 1, "host": host, "p99_ms": rng.randint(2500, 9000)}),
        assistant_calls([c2], "Only 1 of 3 instances is healthy. Reading the logs."),
        result(c2, logs),
        assistant_calls([c3], f"The disk is full on {host}. Checking which volume."),
        result(c3, {"host": host, "volumes": [{"mount": "/", "used_pct": 41}, {"mount": "/var", "used_pct": used}]}),
        assistant_calls([c4], f"/var is at {used}%. Old log files are the usual culprit, and deleting logs older than 7 days is pre-approved; I'll use {days} days."),
        result(c4, {"deleted_files": rng.randint(40, 300), "freed_gb": freed, "var_used_pct_after": used - freed}),
        assistant_calls([c5], f"/var is down to {used - freed}%. Restarting the service so instances recover from the failed writes."),
        result(c5, {"status": "restarted", "instances": 3}),
        assistant_calls([c6], "Verifying."),
        result(c6, {"service": svc, "healthy": True, "instances": 3, "healthy_instances": 3, "host": host, "p99_ms": rng.randint(80, 240)}),
        {"role": "assistant", "content": f"{svc} is healthy again (3/3 instances).\n\nCause: /var on {host} filled up ({used}%), so writes failed and health checks timed out. "
                                         f"I deleted logs older than {days} days (freed {freed} GB; /var now {used - freed}%) and restarted the service.\n\n"
                                         "Follow-up for a human: log rotation on this host isn't keeping up; cap log size or ship logs off the box."},
    ]
    return OPS_TOOLS, msgs


def ag_support(rng):
    oid = f"A-{rng.randint(10000, 99999)}"
    sku = f"SKU-{rng.randint(1000, 9999)}"
    item = rng.choice(["glass teapot", "desk lamp", "ceramic mug set", "bike light", "wireless earbuds"])
    price = rng.choice([19.9, 24.5, 39.0, 59.95, 89.0])
    in_stock = rng.random() < 0.6
    customer = rng.choice(PEOPLE)
    c1 = call(rng, "lookup_order", {"order_id": oid})
    c2 = call(rng, "check_stock", {"sku": sku})
    msgs = [
        {"role": "system", "content": AGENT_SYSTEM + " You handle customer support tickets. Replacements and refunds up to 100 EUR are pre-approved."},
        {"role": "user", "content": f"Ticket from {customer}: \"My {item} from order {oid} arrived broken. Photo attached. I'd like a replacement, or my money back if that's not possible.\""},
        assistant_calls([c1], "Plan: verify the order, check stock for a replacement, then either ship one or refund, and reply to the customer."),
        result(c1, {"order_id": oid, "status": "delivered", "customer_email": f"{customer.lower()}@example.net",
                    "lines": [{"sku": sku, "name": item, "qty": 1, "price_eur": price}]}),
        assistant_calls([c2], f"Order confirmed: one {item} at {price} EUR, delivered. The customer prefers a replacement, so checking stock."),
        result(c2, {"sku": sku, "warehouses": [{"code": "RTM", "available": rng.randint(3, 40) if in_stock else 0},
                                                {"code": "LYS", "available": 0}]}),
    ]
    if in_stock:
        c3 = call(rng, "create_replacement", {"order_id": oid, "sku": sku, "warehouse": "RTM"})
        msgs += [assistant_calls([c3], "Rotterdam has stock. Creating a free replacement."),
                 result(c3, {"shipment_id": f"SHP-{rng.randint(100000, 999999)}", "eta_days": 3})]
        outcome = f"a replacement {item} is on its way and should arrive within 3 days"
    else:
        c3 = call(rng, "issue_refund", {"order_id": oid, "amount": price, "reason": "arrived damaged, no stock for replacement"})
        msgs += [assistant_calls([c3], f"No stock anywhere, so a replacement isn't possible. Refunding {price} EUR, which is within the pre-approved limit."),
                 result(c3, {"refund_id": f"RF-{rng.randint(10000, 99999)}", "status": "issued", "amount_eur": price})]
        outcome = f"we couldn't replace the {item} because it's out of stock, so we refunded {price:.2f} EUR to your original payment method (3-5 business days)"
    body = f"Hi {customer},\n\nSorry your {item} arrived broken. Good news: {outcome}. No need to send the broken one back.\n\nBest regards,\nCustomer Care"
    c4 = call(rng, "send_email", {"to": f"{customer.lower()}@example.net", "subject": f"Your order {oid}", "body": body})
    msgs += [assistant_calls([c4], "Letting the customer know."), result(c4, {"status": "sent"}),
             {"role": "assistant", "content": f"Ticket resolved: {outcome.replace('your original', 'the original')}. {customer} has been emailed."}]
    return SUPPORT_TOOLS, msgs


def ag_travel(rng):
    (o, oname), (d, dname) = rng.sample(AIRPORTS, 2)
    day = rng.randint(4, 24)
    budget = rng.choice([150, 200, 250])
    c1 = call(rng, "search_flights", {"origin": o, "destination": d, "date": f"2025-04-{day:02d}", "passengers": 1})
    flights = []
    for k in range(3):
        dep = rng.randint(6, 19)
        price = rng.randint(70, 320)
        flights.append({"flight": f"NS{rng.randint(100, 999)}", "depart": f"{dep:02d}:{rng.choice(['05', '20', '40'])}", "stops": k % 2,
                        "price_per_person_eur": price})
    ok = [f for f in flights if f["price_per_person_eur"] <= budget]
    c2 = call(rng, "get_weather", {"city": dname, "unit": "celsius"})
    temp = rng.randint(9, 24)
    msgs = [{"role": "system", "content": AGENT_SYSTEM},
            {"role": "user", "content": f"I need to get from {oname} to {dname} on April {day}, under {budget} EUR, and tell me what to pack."},
            assistant_calls([c1], "Plan: search flights for that date, keep the ones under budget, then check the destination weather for packing advice."),
            result(c1, {"results": flights})]
    if ok:
        best = min(ok, key=lambda f: (f["stops"], f["price_per_person_eur"]))
        note = (f"{len(ok)} of {len(flights)} flights fit the budget. I'll prefer direct flights, then price: "
                f"{best['flight']} at {best['depart']} for {best['price_per_person_eur']} EUR.")
    else:
        best = min(flights, key=lambda f: f["price_per_person_eur"])
        note = f"None fit the {budget} EUR budget; the cheapest is {best['flight']} at {best['price_per_person_eur']} EUR."
    msgs += [assistant_calls([c2], note + " Now the weather."),
             result(c2, {"city": dname, "temperature": temp, "unit": "celsius", "condition": rng.choice(["light rain", "sunny", "cloudy"])}),
             {"role": "assistant", "content": (f"Flight: {best['flight']}, departing {best['depart']}, "
                                               f"{'direct' if best['stops'] == 0 else 'one stop'}, {best['price_per_person_eur']} EUR"
                                               + ("" if ok else f" (over your {budget} EUR budget; nothing cheaper flies that day)") + ".\n\n"
                                               f"Packing: it's around {temp}°C in {dname} now, so "
                                               + ("bring a warm layer and a rain jacket." if temp < 15 else "light layers and a thin jacket for the evening will do."))}]
    return [TOOLS["search_flights"], TOOLS["get_weather"]], msgs


AGENT_SCENARIOS = [ag_fix_bug, ag_research, ag_data_report, ag_ops, ag_support, ag_travel]


def gen_agentic(rng: random.Random, count: int) -> list[dict]:
    out = []
    for i in range(count):
        tools, messages = AGENT_SCENARIOS[i % len(AGENT_SCENARIOS)](rng)
        out.append({"messages": messages, "tools": tools})
    return out


# =============================================================================== worked reasoning

def r_percent_chain(rng):
    price = rng.choice([80, 120, 250, 64, 480, 1500])
    up, down = rng.choice([10, 20, 25, 30, 50]), rng.choice([10, 20, 25, 40])
    after_up = Fraction(price) * (100 + up) / 100
    final = after_up * (100 - down) / 100
    net = (final - price) / price * 100
    q = (f"A jacket costs ${price}. The shop raises the price by {up}%, then puts it on sale at {down}% off. "
         f"Is the final price higher or lower than the original, and by what percent?")
    a = (f"Work with multipliers.\n\n1. A {up}% increase multiplies the price by {1 + up / 100:g}: ${price} x {1 + up / 100:g} = ${float(after_up):g}.\n"
         f"2. A {down}% discount multiplies by {1 - down / 100:g}: ${float(after_up):g} x {1 - down / 100:g} = ${float(final):g}.\n"
         f"3. Combined multiplier: {1 + up / 100:g} x {1 - down / 100:g} = {float(final / price):g}.\n\n"
         + (f"The final price is ${float(final):g}, which is {abs(float(net)):g}% {'higher' if net > 0 else 'lower'} than the original."
            if net != 0 else f"The final price is ${float(final):g}, exactly the original.")
         + " Percentages don't cancel because the discount applies to the already-raised price.")
    return q, a


def r_trains(rng):
    d = rng.choice([300, 360, 420, 480, 540])
    v1, v2 = rng.choice([60, 70, 80, 90]), rng.choice([50, 60, 75, 100])
    t = Fraction(d, v1 + v2)
    hours = int(t)
    minutes = (t - hours) * 60
    x = v1 * t
    q = (f"Two trains leave at 9:00 from stations {d} km apart and head toward each other, one at {v1} km/h and the "
         f"other at {v2} km/h. When and where do they meet?")
    a = (f"They close the gap at the sum of their speeds: {v1} + {v2} = {v1 + v2} km/h.\n\n"
         f"Time to meet: {d} / {v1 + v2} = {float(t):.4g} h" + (f" = {hours} h {float(minutes):.0f} min" if minutes else f" = {hours} h") + ".\n"
         f"So they meet at {9 + hours}:{int(round(float(minutes))):02d}.\n\n"
         f"Place: the first train has covered {v1} x {float(t):.4g} = {float(x):.1f} km, and the second {float(d - x):.1f} km. "
         f"Check: {float(x):.1f} + {float(d - x):.1f} = {d} km.")
    return q, a


def r_pipes(rng):
    a_h, b_h = rng.choice([(3, 6), (4, 12), (5, 20), (6, 3), (2, 3), (4, 6), (10, 15)])
    rate = Fraction(1, a_h) + Fraction(1, b_h)
    t = 1 / rate
    q = f"Pipe A fills a tank in {a_h} hours and pipe B in {b_h} hours. How long do they take together?"
    a = (f"Add rates, not times.\n\n- A fills 1/{a_h} of the tank per hour.\n- B fills 1/{b_h} per hour.\n"
         f"- Together: 1/{a_h} + 1/{b_h} = {rate} of the tank per hour.\n\n"
         f"Time = 1 / ({rate}) = {t} hours" + (f" = {float(t):.4g} h, about {int(t)} h {round(float(t - int(t)) * 60)} min" if t.denominator != 1 else "") + ".\n\n"
         f"Sanity check: it must be faster than the faster pipe alone ({min(a_h, b_h)} h), and it is.")
    return q, a


def r_interest(rng):
    p, r, y = rng.choice([1000, 2500, 8000, 10000]), rng.choice([2, 3, 5, 8]), rng.choice([2, 3, 5, 10])
    simple = p * r * y / 100
    comp = p * (1 + r / 100) ** y - p
    q = f"What is the difference between simple and compound interest on ${p:,} at {r}% per year for {y} years?"
    a = (f"Simple interest: P x r x t = {p:,} x {r / 100:g} x {y} = ${simple:,.2f}.\n\n"
         f"Compound interest (yearly): P(1 + r)^t - P = {p:,} x {1 + r / 100:g}^{y} - {p:,} = {p * (1 + r / 100) ** y:,.2f} - {p:,} = ${comp:,.2f}.\n\n"
         f"Difference: ${comp - simple:,.2f}. Compounding earns interest on earlier interest, and the gap grows with time.")
    return q, a


def r_linear_system(rng):
    x, y = rng.randint(-6, 9), rng.randint(-5, 9)
    a1, b1, a2, b2 = rng.randint(1, 5), rng.randint(1, 5), rng.randint(1, 5), rng.randint(-5, -1)
    while a1 * b2 - a2 * b1 == 0:
        a2 += 1
    c1, c2 = a1 * x + b1 * y, a2 * x + b2 * y
    q = f"Solve the system: {a1}x + {b1}y = {c1} and {a2}x {'+' if b2 >= 0 else '-'} {abs(b2)}y = {c2}."
    m1, m2 = a2, a1
    e_b = b1 * m1 - b2 * m2
    e_c = c1 * m1 - c2 * m2
    a = (f"Eliminate x. Multiply the first equation by {m1} and the second by {m2}:\n"
         f"  {a1 * m1}x + {b1 * m1}y = {c1 * m1}\n  {a2 * m2}x {'+' if b2 * m2 >= 0 else '-'} {abs(b2 * m2)}y = {c2 * m2}\n"
         f"Subtract: {e_b}y = {e_c}, so y = {e_c} / {e_b} = {y}.\n\n"
         f"Substitute into the first equation: {a1}x + {b1} x {y} = {c1}, so {a1}x = {c1 - b1 * y} and x = {x}.\n\n"
         f"Check with the second: {a2} x {x} + ({b2}) x {y} = {a2 * x + b2 * y} = {c2}. ✓\n\nSolution: x = {x}, y = {y}.")
    return q, a


def r_dice(rng):
    target = rng.randint(4, 10)
    ways = [(i, target - i) for i in range(1, 7) if 1 <= target - i <= 6]
    p = Fraction(len(ways), 36)
    q = f"Two fair six-sided dice are rolled. What is the probability that they sum to {target}?"
    a = (f"There are 6 x 6 = 36 equally likely ordered outcomes. Pairs summing to {target}: "
         + ", ".join(f"({i},{j})" for i, j in ways) + f", which is {len(ways)} outcomes.\n\n"
         f"P = {len(ways)}/36 = {p} ≈ {float(p):.3f}.")
    return q, a


def r_cards(rng):
    k = rng.choice([2, 3])
    suit_p = Fraction(13, 52) * Fraction(12, 51) * (Fraction(11, 50) if k == 3 else 1)
    q = f"Drawing {k} cards from a shuffled 52-card deck without replacement, what's the probability they are all hearts?"
    steps = "13/52 x 12/51" + (" x 11/50" if k == 3 else "")
    a = (f"Multiply the chances draw by draw, since each draw removes a heart and a card:\n\n{steps} = {suit_p} ≈ {float(suit_p):.4f}.\n\n"
         f"Equivalently, C(13,{k}) / C(52,{k}) = {math.comb(13, k)} / {math.comb(52, k)} = {Fraction(math.comb(13, k), math.comb(52, k))}.")
    return q, a


def r_gcd(rng):
    g = rng.choice([6, 8, 9, 12, 14, 15, 18, 21])
    a0, b0 = g * rng.randint(7, 40), g * rng.randint(3, 25)
    if a0 < b0:
        a0, b0 = b0, a0
    lines, a, b = [], a0, b0
    while b:
        q_, r_ = divmod(a, b)
        lines.append(f"{a} = {q_} x {b} + {r_}")
        a, b = b, r_
    lcm = a0 * b0 // a
    q = f"Find the greatest common divisor and the least common multiple of {a0} and {b0}."
    ans = ("Euclid's algorithm: divide, keep the remainder, repeat.\n\n" + "\n".join(lines)
           + f"\n\nThe last non-zero remainder is {a}, so gcd({a0}, {b0}) = {a}.\n\n"
           f"lcm = a x b / gcd = {a0} x {b0} / {a} = {lcm}.")
    return q, ans


def r_factor(rng):
    ps = sorted(rng.choices([2, 3, 5, 7, 11, 13], k=rng.randint(3, 6)))
    nval = math.prod(ps)
    lines, m = [], nval
    for p in ps:
        lines.append(f"{m} / {p} = {m // p}")
        m //= p
    counts = {p: ps.count(p) for p in sorted(set(ps))}
    expr = " x ".join(f"{p}^{c}" if c > 1 else str(p) for p, c in counts.items())
    divisors = math.prod(c + 1 for c in counts.values())
    q = f"What is the prime factorization of {nval}, and how many divisors does it have?"
    a = ("Divide by the smallest prime that works, repeatedly:\n" + "\n".join(lines)
         + f"\n\nSo {nval} = {expr}.\n\nNumber of divisors: add one to each exponent and multiply: "
         + " x ".join(str(c + 1) for c in counts.values()) + f" = {divisors}.")
    return q, a


def r_weighted_avg(rng):
    parts = [("homework", rng.choice([20, 25])), ("midterm", rng.choice([30, 35])), ("final", None)]
    parts[2] = ("final", 100 - parts[0][1] - parts[1][1])
    scores = [rng.randint(62, 98) for _ in parts]
    total = sum(w * sc for (_, w), sc in zip(parts, scores)) / 100
    need = 90
    rest = sum(w * sc for (_, w), sc in zip(parts[:2], scores[:2])) / 100
    req = (need - rest) / (parts[2][1] / 100)
    q = (f"A course grade is {parts[0][1]}% homework, {parts[1][1]}% midterm and {parts[2][1]}% final exam. "
         f"A student has {scores[0]} on homework and {scores[1]} on the midterm. (a) What grade do they get with {scores[2]} on the final? "
         f"(b) What final score would they need for an overall 90?")
    a = (f"(a) Weighted average: {parts[0][1] / 100:g} x {scores[0]} + {parts[1][1] / 100:g} x {scores[1]} + {parts[2][1] / 100:g} x {scores[2]} = {total:.2f}.\n\n"
         f"(b) Homework and midterm already contribute {rest:.2f} points. The final must add {need - rest:.2f}, "
         f"so the score needed is {need - rest:.2f} / {parts[2][1] / 100:g} = {req:.2f}."
         + (" That's above 100, so 90 overall is no longer reachable." if req > 100 else ""))
    return q, a


def r_ages(rng):
    child = rng.randint(4, 14)
    k = rng.choice([3, 4, 5])
    parent = k * child
    years = rng.randint(2, 20)
    ratio = Fraction(parent + years, child + years)
    q = f"A parent is {k} times as old as their child. The child is {child}. In {years} years, what will the ratio of their ages be?"
    a = (f"Parent now: {k} x {child} = {parent}.\nIn {years} years: parent {parent + years}, child {child + years}.\n"
         f"Ratio: {parent + years}/{child + years} = {ratio}" + (f" ≈ {float(ratio):.3f}" if ratio.denominator != 1 else "")
         + ".\n\nThe ratio shrinks toward 1 over time because both ages grow by the same amount.")
    return q, a


def r_last_digit(rng):
    base, exp = rng.choice([2, 3, 7, 8, 9, 13, 17]), rng.randint(20, 2025)
    cycle, v = [], base % 10
    while v not in cycle:
        cycle.append(v)
        v = (v * base) % 10
    idx = (exp - 1) % len(cycle)
    q = f"What is the last digit of {base}^{exp}?"
    a = (f"Last digits of powers of {base} repeat. Compute them: "
         + ", ".join(f"{base}^{i + 1} ends in {d}" for i, d in enumerate(cycle))
         + f", then the pattern repeats with period {len(cycle)}.\n\n"
         f"Position in the cycle: ({exp} - 1) mod {len(cycle)} = {idx}, i.e. the {idx + 1}{'st' if idx == 0 else 'nd' if idx == 1 else 'rd' if idx == 2 else 'th'} entry.\n\n"
         f"So {base}^{exp} ends in {cycle[idx]}. (Check: pow({base}, {exp}, 10) = {pow(base, exp, 10)}.)")
    return q, a


def r_series(rng):
    a1, dd, nn = rng.randint(1, 20), rng.randint(2, 9), rng.randint(15, 120)
    last = a1 + (nn - 1) * dd
    total = nn * (a1 + last) // 2
    q = f"Find the sum of the arithmetic sequence {a1}, {a1 + dd}, {a1 + 2 * dd}, ... with {nn} terms."
    a = (f"Last term: a_n = a_1 + (n - 1)d = {a1} + {nn - 1} x {dd} = {last}.\n"
         f"Sum: n(a_1 + a_n)/2 = {nn} x ({a1} + {last}) / 2 = {nn} x {a1 + last} / 2 = {total}.\n\n"
         f"(Pairing first and last terms gives {nn / 2:g} pairs each summing to {a1 + last}.)")
    return q, a


def r_geometry(rng):
    kind = rng.randrange(3)
    if kind == 0:
        a_, b_ = rng.choice([(3, 4), (5, 12), (8, 15), (7, 24), (6, 8), (9, 12), (20, 21)])
        c_ = math.isqrt(a_ * a_ + b_ * b_)
        q = f"A ladder reaches {b_} m up a wall with its foot {a_} m from the wall. How long is the ladder, and what is the triangle's area?"
        ans = (f"The wall, ground and ladder form a right triangle. Pythagoras: c² = {a_}² + {b_}² = {a_ * a_} + {b_ * b_} = {c_ * c_}, "
               f"so the ladder is {c_} m long.\n\nArea = ½ x {a_} x {b_} = {a_ * b_ / 2:g} m².")
    elif kind == 1:
        r_ = rng.choice([3, 5, 7.5, 10, 12])
        q = f"A circular garden bed has a radius of {r_:g} m. How much edging do I need, and how much soil area is there?"
        ans = (f"Edging is the circumference: 2πr = 2 x π x {r_:g} = {2 * math.pi * r_:.2f} m.\n"
               f"Area: πr² = π x {r_:g}² = {math.pi * r_ * r_:.2f} m².\n\nRound the edging up: buy {math.ceil(2 * math.pi * r_)} m.")
    else:
        l_, w_, h_ = rng.randint(2, 8), rng.randint(2, 6), rng.choice([0.3, 0.5, 1.2, 1.5])
        vol = l_ * w_ * h_
        q = f"A raised planter is {l_} m long, {w_} m wide and {h_:g} m deep. How many litres of soil fill it?"
        ans = (f"Volume = length x width x depth = {l_} x {w_} x {h_:g} = {vol:g} m³.\n"
               f"1 m³ = 1000 litres, so it takes {vol * 1000:,.0f} litres. Soil settles, so order about 10% more: {vol * 1100:,.0f} litres.")
    return q, ans


def r_mixture(rng):
    v1, c1 = rng.choice([2, 3, 4, 5]), rng.choice([10, 20, 30])
    c2 = rng.choice([50, 60, 80])
    target = rng.choice([c for c in range(c1 + 5, c2, 5)])
    v2 = Fraction(v1 * (target - c1), c2 - target)
    q = f"How many litres of a {c2}% acid solution must be added to {v1} L of a {c1}% solution to get a {target}% solution?"
    a = (f"Let x be the litres of {c2}% solution. Acid is conserved:\n"
         f"{c1 / 100:g} x {v1} + {c2 / 100:g}x = {target / 100:g}({v1} + x)\n"
         f"{c1 * v1 / 100:g} + {c2 / 100:g}x = {target * v1 / 100:g} + {target / 100:g}x\n"
         f"{(c2 - target) / 100:g}x = {(target - c1) * v1 / 100:g}\n"
         f"x = {v2}" + (f" ≈ {float(v2):.3f}" if v2.denominator != 1 else "") + " L.\n\n"
         f"Check: acid = {c1 * v1 / 100:g} + {float(c2 * v2 / 100):.4g} = {float(Fraction(c1 * v1, 100) + c2 * v2 / 100):.4g} L in {float(v1 + v2):.4g} L, which is {target}%.")
    return q, a


def r_speed_avg(rng):
    d = rng.choice([60, 90, 120, 150])
    v1, v2 = rng.choice([(40, 60), (30, 60), (50, 75), (60, 90), (45, 90)])
    t1, t2 = Fraction(d, v1), Fraction(d, v2)
    avg = Fraction(2 * d) / (t1 + t2)
    q = f"I drive {d} km to a town at {v1} km/h and back at {v2} km/h. What's my average speed for the round trip?"
    a = (f"Not the mean of the speeds ({(v1 + v2) / 2:g}), because I spend longer at the slower speed.\n\n"
         f"Out: {d}/{v1} = {float(t1):.4g} h. Back: {d}/{v2} = {float(t2):.4g} h. Total {float(t1 + t2):.4g} h for {2 * d} km.\n"
         f"Average = {2 * d} / {float(t1 + t2):.4g} = {float(avg):.4g} km/h (the harmonic mean: 2 x {v1} x {v2} / ({v1} + {v2}) = {float(Fraction(2 * v1 * v2, v1 + v2)):.4g}).")
    return q, a


REASONING_FAMILIES = [r_percent_chain, r_trains, r_pipes, r_interest, r_linear_system, r_dice, r_cards, r_gcd,
                      r_factor, r_weighted_avg, r_ages, r_last_digit, r_series, r_geometry, r_mixture, r_speed_avg]
REASONING_SYSTEMS = [None, None, "Show your reasoning step by step, then state the answer clearly.",
                     "You are a patient maths tutor. Explain each step so a student can follow."]


def gen_reasoning(rng: random.Random, count: int) -> list[dict]:
    out = []
    for i in range(count):
        q, a = REASONING_FAMILIES[i % len(REASONING_FAMILIES)](rng)
        msgs = []
        system = rng.choice(REASONING_SYSTEMS)
        if system:
            msgs.append({"role": "system", "content": system})
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        out.append({"messages": msgs})
    return out


# =============================================================================== main

def write_jsonl(path: Path, records: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n" for r in records)
    path.write_text(text, encoding="utf-8")
    print(f"{path.relative_to(HERE)}: {len(records)} records, {len(text.encode())} bytes")


def main() -> None:
    write_jsonl(HERE / "tool-calling" / "generated-tool-calls.jsonl", gen_tool_calling(random.Random(SEED + 1), 96))
    write_jsonl(HERE / "agentic" / "generated-agent-traces.jsonl", gen_agentic(random.Random(SEED + 2), 36))
    write_jsonl(HERE / "reasoning" / "generated-worked-problems.jsonl", gen_reasoning(random.Random(SEED + 3), 160))


if __name__ == "__main__":
    main()
