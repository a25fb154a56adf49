"""Draw who talks to whom in a private prediction, and what each party sees: parties.svg (English)
and participantes.svg (Spanish), beside this file. Plain SVG, no dependencies:

    python3 docs/figures/parties.py
"""
from pathlib import Path
from xml.sax.saxutils import escape

WORDS = {
    "parties.svg": {
        "title": "A private prediction: who talks to whom, and what each one sees",
        "client": "client (your device)", "client_does": ["image x = x0 + x1", "answer y = y0 + y1"],
        "client_sees": "sees: the image, the answer",
        "server0": "server0", "server0_sees": ["holds: w0, x0, y0", "sees: openings, each uniform;", "batch size, timing, which card"],
        "server1": "server1", "server1_sees": ["holds: w1, x1, y1", "sees: openings, each uniform;", "batch size, timing, which card"],
        "server2": "server2", "server2_sees": ["holds: no share of the data", "deals: masks, triples", "sees: a fair coin per value"],
        "owner": "model owner", "owner_sees": ["w0 to server0, w1 to server1;", "tells the servers what to compute;", "sees: who asked, when, how many"],
        "openings": ["openings, e.g.", "x − a, x + 2^k + r"],
        "dealt": "dealt: masks, triples; masked sign bit, shared", "scrambled": "scrambled numbers mod a small prime",
        "footer": "No single server sees x, y or w. Any two servers together would: the protection assumes they do not collude.",
    },
    "participantes.svg": {
        "title": "Una predicción privada: quién habla con quién y qué ve cada uno",
        "client": "cliente (tu equipo)", "client_does": ["imagen x = x0 + x1", "respuesta y = y0 + y1"],
        "client_sees": "ve: la imagen, la respuesta",
        "server0": "server0", "server0_sees": ["guarda: w0, x0, y0", "ve: aperturas, cada una uniforme;", "tamaño del lote, hora, tarjeta"],
        "server1": "server1", "server1_sees": ["guarda: w1, x1, y1", "ve: aperturas, cada una uniforme;", "tamaño del lote, hora, tarjeta"],
        "server2": "server2", "server2_sees": ["sin partes secretas de los datos", "reparte: máscaras, ternas", "ve: una moneda al aire por valor"],
        "owner": "propietario del modelo", "owner_sees": ["w0 a server0, w1 a server1;", "dice a los servidores qué calcular;", "ve: quién pide, cuándo y cuánto"],
        "openings": ["aperturas, p. ej.", "x − a, x + 2^k + r"],
        "dealt": "máscaras, ternas; bit de signo, en partes", "scrambled": "números mezclados, módulo un primo pequeño",
        "footer": "Ningún servidor ve por sí solo ni x, ni y, ni w. Dos servidores cualesquiera, juntos, sí: la protección supone que no se confabulan.",
    },
}

FONT = "font-family='DejaVu Sans, Arial, sans-serif'"


def box(x, y, w, h, title, lines, fill):
    parts = [f"<rect x='{x}' y='{y}' width='{w}' height='{h}' rx='10' fill='{fill}' stroke='#444' stroke-width='1.5'/>",
             f"<text x='{x + w / 2}' y='{y + 22}' text-anchor='middle' font-size='16' font-weight='bold' {FONT}>"
             f"{escape(title)}</text>"]
    for i, line in enumerate(lines):
        parts.append(f"<text x='{x + w / 2}' y='{y + 44 + 18 * i}' text-anchor='middle' font-size='13' {FONT}>"
                     f"{escape(line)}</text>")
    return parts


def arrow(x1, y1, x2, y2, label, marker, dx=0, dy=-6, colour="#333", both=False):
    marker = f"url(#head-{marker})"
    start = f" marker-start='{marker}'" if both else ""
    mx, my = (x1 + x2) / 2 + dx, (y1 + y2) / 2 + dy
    return [f"<line x1='{x1}' y1='{y1}' x2='{x2}' y2='{y2}' stroke='{colour}' stroke-width='2' "
            f"marker-end='{marker}'{start}/>",
            f"<text x='{mx}' y='{my}' text-anchor='middle' font-size='12' fill='{colour}' {FONT}>{escape(label)}</text>"]


def draw(words) -> str:
    w, h = 960, 500
    green, brown, purple = "#2f6b2f", "#8a5200", "#6a3d8a"
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' viewBox='0 0 {w} {h}'>",
             "<defs>" + "".join(f"<marker id='head-{name}' markerWidth='10' markerHeight='8' refX='9' refY='4' "
                                f"orient='auto-start-reverse'><path d='M0,0 L10,4 L0,8 z' fill='{colour}'/></marker>"
                                for name, colour in (("dark", "#333"), ("green", green), ("brown", brown),
                                                     ("purple", purple))) + "</defs>",
             f"<rect width='{w}' height='{h}' fill='white'/>",
             f"<text x='{w / 2}' y='30' text-anchor='middle' font-size='18' font-weight='bold' {FONT}>"
             f"{escape(words['title'])}</text>",
             "<rect x='330' y='55' width='615' height='375' rx='14' fill='none' stroke='#999' stroke-dasharray='6 4'/>"]
    parts += box(15, 55, 250, 100, words["owner"], words["owner_sees"], "#f3ecf8")
    parts += box(15, 215, 250, 110, words["client"], words["client_does"] + [words["client_sees"]], "#e8f1fb")
    parts += box(360, 75, 250, 100, words["server0"], words["server0_sees"], "#fdf0e0")
    parts += box(360, 310, 250, 100, words["server1"], words["server1_sees"], "#fdf0e0")
    parts += box(690, 190, 240, 100, words["server2"], words["server2_sees"], "#eef7e8")
    # the model owner's process drives the servers' computation
    parts += arrow(265, 100, 330, 100, "", marker="purple", colour=purple)
    # the client: a share to server0 and to server1, a share of the answer back from each
    parts += arrow(265, 235, 360, 140, "x0", marker="dark", dx=-12, dy=-8)
    parts += arrow(360, 160, 265, 255, "y0", marker="dark", dx=12, dy=18)
    parts += arrow(265, 285, 360, 345, "x1", marker="dark", dx=-8, dy=-18)
    parts += arrow(360, 370, 265, 305, "y1", marker="dark", dx=12, dy=20)
    # server0 and server1 open masked values to each other
    parts += arrow(485, 175, 485, 310, "", marker="dark", both=True)
    for i, line in enumerate(words["openings"]):
        parts.append(f"<text x='495' y='{235 + 16 * i}' font-size='12' {FONT}>{escape(line)}</text>")
    # server2 deals to both, and receives scrambled numbers from both
    parts += arrow(700, 200, 610, 140, "", marker="green", colour=green)
    parts += arrow(700, 280, 610, 345, "", marker="green", colour=green)
    parts += arrow(610, 160, 690, 215, "", marker="brown", colour=brown)
    parts += arrow(610, 325, 690, 265, "", marker="brown", colour=brown)
    for i, (colour, text) in enumerate(((green, words["dealt"]), (brown, words["scrambled"]))):
        y = 380 + 22 * i
        parts.append(f"<line x1='15' y1='{y}' x2='45' y2='{y}' stroke='{colour}' stroke-width='3'/>")
        parts.append(f"<text x='53' y='{y + 4}' font-size='12' fill='{colour}' {FONT}>{escape(text)}</text>")
    parts.append(f"<text x='{w / 2}' y='{h - 35}' text-anchor='middle' font-size='13' font-style='italic' {FONT}>"
                 f"{escape(words['footer'])}</text>")
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    for name, words in WORDS.items():
        (Path(__file__).parent / name).write_text(draw(words), encoding="utf-8")
