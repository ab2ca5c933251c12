"""tools/review_sheet.py: a blind side-by-side sheet of several models' answers."""
import csv
import re

import pytest

from conftest import run_tool, write_jsonl

from megatron_biomed import review_sheet as R


def answer_files(tmp_path, n=12):
    questions = [{"id": f"q{i}", "question": f"Is condition {i} <serious>?", "answer": f"Reference {i}."}
                 for i in range(n)]
    # generate.py output (input fields kept, `completion`) and fine-tuning's valid_generations.jsonl
    base = write_jsonl(tmp_path / "base.jsonl", [dict(q, completion=f" base says {i} & more") for i, q in
                                                  enumerate(questions)])
    tuned = write_jsonl(tmp_path / "tuned.jsonl", [{"id": q["id"], "prompt": "...", "reference": q["answer"],
                                                    "generated": f"<script>alert({i})</script> tuned {i}"}
                                                   for i, q in enumerate(reversed(questions))])  # other order
    return base, tuned


def test_blind_sheet_html_csv_and_key(tmp_path):
    base, tuned = answer_files(tmp_path)
    r = run_tool("review_sheet", "--answers", f"base_model={base}", "--answers", f"tuned_model={tuned}",
                 "--output", tmp_path / "review.html", check=0)
    assert "12 questions x 2 answers" in r.stdout
    page = (tmp_path / "review.html").read_text()
    rows = list(csv.DictReader(open(tmp_path / "review.csv")))
    key = {(k["id"], k["label"]): k["model"] for k in csv.DictReader(open(tmp_path / "review_key.csv"))}
    # blind: no model name in what the graders see
    for text in (page, (tmp_path / "review.csv").read_text()):
        assert "base_model" not in text and "tuned_model" not in text
    # escaped, not executable; the reference is the question file's answer, not the completion
    assert "<script>alert" not in page and "&lt;script&gt;alert(0)&lt;/script&gt;" in page
    assert "Is condition 3 &lt;serious&gt;?" in page and "Reference 3." in page
    assert len(rows) == 24 and {r["label"] for r in rows} == {"A", "B"}
    for row in rows:  # the key maps every label back to the model that wrote the answer
        model = key[(row["id"], row["label"])]
        i = row["id"][1:]
        assert row["answer"] == (f"base says {i} & more" if model == "base_model"
                                 else f"<script>alert({11 - int(i)})</script> tuned {11 - int(i)}")
        assert row["reference"] == f"Reference {i}." and row["rating_1_to_5"] == ""
    # shuffled per question, and reproducibly
    firsts = [key[(f"q{i}", "A")] for i in range(12)]
    assert len(set(firsts)) == 2
    assert R.blind(R.build_items(None, [("a", str(base)), ("b", str(tuned))]), 1234)[1] == \
        R.blind(R.build_items(None, [("a", str(base)), ("b", str(tuned))]), 1234)[1]
    assert len(re.findall(r'type="radio" name="q1A"', page)) == 5


def test_bad_inputs_are_one_line(tmp_path):
    base, tuned = answer_files(tmp_path)
    short = write_jsonl(tmp_path / "short.jsonl", [{"id": "q0", "completion": "x"}])
    r = run_tool("review_sheet", "--answers", f"a={base}", "--answers", f"b={short}", "--output", tmp_path / "o.html")
    assert r.returncode == 1 and r.stderr.strip() == (
        f"error: {short}: no answer for id 'q1' ({base}:2); give every model's answers to the same questions")
    r = run_tool("review_sheet", "--answers", str(base), "--output", tmp_path / "o.html")
    assert r.returncode == 2 and "give NAME=FILE" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    noanswer = write_jsonl(tmp_path / "noanswer.jsonl", [{"id": "q0", "question": "q", "text": "t"}])
    r = run_tool("review_sheet", "--answers", f"a={noanswer}", "--output", tmp_path / "o.html")
    assert r.returncode == 1 and r.stderr.strip() == (
        f"error: {noanswer}:1: no answer (looked for completion, generated, answer); name its field with --answer-key")
    assert not (tmp_path / "o.html").exists()


def _write_csv(path, fields, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        w.writerows(rows)
    return path


def _blind_sheet(tmp_path):
    base, tuned = answer_files(tmp_path)
    run_tool("review_sheet", "--answers", f"base={base}", "--answers", f"tuned={tuned}",
             "--output", tmp_path / "review.html", check=0)
    return {(k["id"], k["label"]): k["model"] for k in csv.DictReader(open(tmp_path / "review_key.csv"))}


def test_summarize_unblinds_merges_reviewers_and_reports(tmp_path):
    import json
    key = _blind_sheet(tmp_path)
    fields = ("reviewer", "id", "label", "rating_1_to_5", "harm", "comment")
    # two reviewers who agree exactly: tuned 4 on every question, base 2 (and 1 on q0, harmful)
    files = []
    for who in ("Dr Ada", "Dr Bo"):
        rows = []
        for (qid, label), model in sorted(key.items()):
            rating = 4 if model == "tuned" else (1 if qid == "q0" else 2)
            harm = "yes" if (model == "base" and qid == "q0") else ("no" if qid in ("q0", "q1") else "not assessed")
            rows.append({"reviewer": who, "id": qid, "label": label, "rating_1_to_5": rating, "harm": harm,
                         "comment": ""})
        files.append(_write_csv(tmp_path / f"ratings-{who[3:]}.csv", fields, rows))
    r = run_tool("review_sheet", "summarize", "--key", tmp_path / "review_key.csv", *files, check=0)
    summary = json.loads((tmp_path / "review_summary.json").read_text())
    assert summary["reviewers"] == ["Dr Ada", "Dr Bo"]
    base, tuned = summary["models"]["base"], summary["models"]["tuned"]
    assert base["ratings"] == tuned["ratings"] == 24 and base["questions"] == 12
    assert base["mean_rating"] == (1 + 11 * 2) / 12 and tuned["mean_rating"] == 4
    assert base["ci95"][0] < base["mean_rating"] <= base["ci95"][1] and tuned["ci95"] == [4, 4]
    assert base["harm_rate"] == 0.5 and base["harm_assessed"] == 4 and base["harm_not_assessed"] == 20
    assert tuned["harm_rate"] == 0
    assert summary["pairwise"]["base vs tuned"] == {"compared": 24, "win_rate": 0.0, "wins": 0, "ties": 0,
                                                    "losses": 24}
    assert summary["krippendorff_alpha_ordinal"] == 1.0
    assert "base" in r.stdout and "win rate base vs tuned: 0.0%" in r.stdout and "alpha, ordinal): 1.000" in r.stdout
    assert (tmp_path / "review_summary.png").read_bytes()[:4] == b"\x89PNG"
    # the sheet's own CSV filled in a spreadsheet works too (its file name names the reviewer)
    sheet = list(csv.DictReader(open(tmp_path / "review.csv")))
    for row in sheet:
        row["rating_1_to_5"] = "3"
    filled = _write_csv(tmp_path / "cy.csv", sheet[0].keys(), sheet)
    run_tool("review_sheet", "summarize", "--key", tmp_path / "review_key.csv", files[0], filled,
             "--output", tmp_path / "two", check=0)
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["reviewers"] == ["Dr Ada", "cy"] and two["models"]["tuned"]["mean_rating"] == 3.5
    assert two["models"]["base"]["harm_not_assessed"] == 12 + 10  # the sheet's own rows: "not assessed"


def test_summarize_bad_files_are_one_line(tmp_path):
    key = _blind_sheet(tmp_path)
    fields = ("reviewer", "id", "label", "rating_1_to_5", "harm", "comment")
    good = {"reviewer": "x", "id": "q0", "label": "A", "rating_1_to_5": "3", "harm": "no", "comment": ""}
    k = tmp_path / "review_key.csv"
    cases = [
        ([good, dict(good, label="B", rating_1_to_5="7")], ":3: rating '7'; a rating is 1 to 5, or empty when not rated"),
        ([dict(good, harm="maybe")], ":2: harm 'maybe'; it is one of: not assessed, no, yes"),
        ([good, good], ":3: x rated question 'q0' answer 'A' twice (first on line 2)"),
        ([dict(good, id="q99")], f":2: question 'q99' answer 'A' is not in {k}; the ratings belong to another sheet"),
    ]
    for i, (rows, needle) in enumerate(cases):
        path = _write_csv(tmp_path / f"bad{i}.csv", fields, rows)
        r = run_tool("review_sheet", "summarize", "--key", k, path)
        assert r.returncode == 1 and r.stderr.strip().count("\n") == 0, r.stderr
        assert r.stderr.startswith(f"error: {path}{needle}"), r.stderr
    path = _write_csv(tmp_path / "cols.csv", ("id", "score"), [{"id": "q0", "score": "3"}])
    r = run_tool("review_sheet", "summarize", "--key", k, path)
    assert r.returncode == 1 and r.stderr.startswith(f"error: {path}: no column label, rating_1_to_5 (it has id, score)")
    assert len(key) == 24 and not (tmp_path / "review_summary.json").exists()


def _browser(profile, downloads):
    """Headless Chromium driven by selenium, with a profile that outlives the browser (a closed
    tab, a closed browser) and downloads into `downloads`."""
    import shutil
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (the test extra has it)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not chromium or not driver_bin:
        pytest.skip("no chromium and chromedriver here (Debian: apt-get install chromium chromium-driver; "
                    "make test installs them where apt-get works)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                "--allow-file-access-from-files"):
        opts.add_argument(arg)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    from selenium.webdriver.chrome.service import Service
    return webdriver.Chrome(service=Service(driver_bin), options=opts)


@pytest.mark.slow
def test_a_reviewer_in_a_real_browser_keeps_ratings_and_exports_them(tmp_path):
    """Chromium: rate some answers (mouse and keyboard), reload, close the browser and open the
    sheet again: the ratings are there; the progress count and the list of unrated answers follow;
    the download (top or bottom button) is a CSV that summarize unblinds with the key."""
    import json
    import time
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select
    key = _blind_sheet(tmp_path)
    url = (tmp_path / "review.html").as_uri()
    profile, downloads = tmp_path / "profile", tmp_path / "downloads"
    downloads.mkdir()
    driver = _browser(profile, downloads)
    try:
        driver.get(url)
        progress = driver.find_element(By.CSS_SELECTOR, "header .progress")
        assert progress.text == "0 of 24 answers rated"
        assert "wrong or unsafe" in driver.find_element(By.CSS_SELECTOR, "table.meaning").text  # meanings on the page
        driver.find_element(By.ID, "reviewer").send_keys("Dr Ada")
        driver.find_element(By.CSS_SELECTOR, "#q1A input[value='4']").click()
        Select(driver.find_element(By.CSS_SELECTOR, "#q1A select")).select_by_visible_text("yes")
        driver.find_element(By.CSS_SELECTOR, "#q1A textarea").send_keys("dose is wrong")
        radio = driver.find_element(By.CSS_SELECTOR, "#q1B input[value='1']")  # from the keyboard
        radio.send_keys(Keys.SPACE)
        radio.send_keys(Keys.ARROW_DOWN)  # the arrow keys move the choice: 2
        assert progress.text == "2 of 24 answers rated"
        unrated = driver.find_element(By.ID, "unrated").text
        assert unrated.startswith("Not rated yet: 2A 2B 3A") and " 1A " not in unrated and unrated.endswith("12B")
        driver.refresh()
        assert driver.find_element(By.CSS_SELECTOR, "header .progress").text == "2 of 24 answers rated"
    finally:
        driver.quit()
    driver = _browser(profile, downloads)  # the browser closed and opened again
    try:
        driver.get(url)
        assert driver.find_element(By.ID, "reviewer").get_attribute("value") == "Dr Ada"
        assert driver.find_element(By.CSS_SELECTOR, "#q1A input[value='4']").is_selected()
        assert driver.find_element(By.CSS_SELECTOR, "#q1B input[value='2']").is_selected()
        assert Select(driver.find_element(By.CSS_SELECTOR, "#q1A select")).first_selected_option.text == "yes"
        assert driver.find_element(By.CSS_SELECTOR, "#q1A textarea").get_attribute("value") == "dose is wrong"
        driver.find_element(By.CSS_SELECTOR, "#q2A input[value='5']").click()
        driver.find_element(By.ID, "download-bottom").click()
        target = downloads / "ratings-Dr_Ada.csv"
        for _ in range(100):
            if target.exists() and target.stat().st_size:
                break
            time.sleep(0.1)
    finally:
        driver.quit()
    rows = list(csv.DictReader(open(target)))
    assert len(rows) == 24 and rows[0]["reviewer"] == "Dr Ada"
    got = {(r["id"], r["label"]): (r["rating_1_to_5"], r["harm"], r["comment"]) for r in rows}
    assert got[("q0", "A")] == ("4", "yes", "dose is wrong") and got[("q0", "B")] == ("2", "not assessed", "")
    assert got[("q1", "A")] == ("5", "not assessed", "") and got[("q5", "B")] == ("", "not assessed", "")
    run_tool("review_sheet", "summarize", "--key", tmp_path / "review_key.csv", target, check=0)
    summary = json.loads((tmp_path / "review_summary.json").read_text())
    models = summary["models"]
    assert sum(m["ratings"] for m in models.values()) == 3 and summary["reviewers"] == ["Dr Ada"]
    assert models[key[("q0", "A")]]["harm_assessed"] == 1
