//! The web dashboard (`/ui/`) in a real browser: headless Chromium driven over WebDriver
//! (chromedriver) against a real `molt serve` with a worker. Signs in with the keyboard, sees
//! the jobs list, watches a running job's loss curve gain points as steps arrive and cancels
//! it, uploads a bad file and sees its line numbers, reads a finished search (trials table
//! sorted, objective chart, parallel coordinates), warms an adapter, streams a completion and
//! classifies an image in the playground (both equal to the API's own answers), fits a phone's
//! width, loads nothing from another host, and shows another tenant none of it. Screenshots
//! of every page at 1280×800 land in `target/ui-screenshots/`.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::webdriver::Browser;
use common::{ServeOptions, Server, repo_root, text_dataset};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const ENTER: &str = "\u{E007}";
const TAB: &str = "\u{E004}";

fn shots_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
        .join("ui-screenshots")
}

async fn post(s: &Server, path: &str, body: Value) -> Value {
    let (st, v) = s.call(s.req(Method::POST, path).json(&body)).await;
    assert!(st.is_success(), "POST {path}: {st} {v}");
    v
}

/// A LoRA job on the demo model; returns the created job.
async fn lora_job(
    s: &Server,
    train: &str,
    valid: &str,
    epochs: u32,
    eval: u32,
    ckpt: u32,
) -> Value {
    post(
        s,
        "/v1/fine_tuning/jobs",
        json!({"model": "demo", "training_file": train, "validation_file": valid,
               "method": {"type": "lora", "targets": "in_proj", "r": 8},
               "hyperparameters": {"n_epochs": epochs, "batch_size": 4, "max_seq_length": 32,
                                   "eval_every": eval, "checkpoint_every": ckpt}}),
    )
    .await
}

/// The number the page's element `css` carries in attribute `attr` (0 when absent).
async fn attr_num(b: &Browser, css: &str, attr: &str) -> u64 {
    let e = b.find(css).await;
    b.attr(&e, attr)
        .await
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn no_page_errors(b: &Browser, page: &str) {
    let errors = b.console_errors().await;
    assert!(
        errors.is_empty(),
        "{page}: the page reported errors: {errors:?}"
    );
}

async fn open(b: &Browser, s: &Server, hash: &str, ready_css: &str) {
    b.goto(&format!("{}/ui/#{hash}", s.url)).await;
    b.find_within(ready_css, Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_a_real_browser() {
    let s = Server::start(ServeOptions {
        defaults: true,
        workers: 1,
        ..Default::default()
    })
    .await;
    let shots = shots_dir();
    let (_, other_key) = s.new_tenant("someone-else").await;

    // A finished job, so that the lists, the adapter and the playground have something.
    let (st, train) = s.upload("train.jsonl", text_dataset(32)).await;
    assert_eq!(st, StatusCode::OK, "{train}");
    let train = train["id"].as_str().expect("id").to_string();
    let (st, valid) = s.upload("valid.jsonl", text_dataset(8)).await;
    assert_eq!(st, StatusCode::OK, "{valid}");
    let valid = valid["id"].as_str().expect("id").to_string();
    let done = lora_job(&s, &train, &valid, 2, 4, 8).await;
    let done = s
        .wait_job(done["id"].as_str().expect("id"), Duration::from_secs(120))
        .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let done_id = done["id"].as_str().expect("id").to_string();
    let ft_model = done["fine_tuned_model"]
        .as_str()
        .expect("model")
        .to_string();
    let adapter_id = done["adapter_id"].as_str().expect("adapter").to_string();

    // The job and model answers the pages rely on: the status filter and each model's task.
    let (st, v) = s
        .call(s.req(Method::GET, "/v1/fine_tuning/jobs?status=bogus"))
        .await;
    common::assert_error(st, &v, StatusCode::BAD_REQUEST, "invalid_status");
    assert_eq!(v["error"]["param"], "status");
    let succeeded = s.get_ok("/v1/fine_tuning/jobs?status=succeeded").await;
    assert_eq!(succeeded["data"][0]["id"], json!(done_id));
    assert_eq!(succeeded["data"].as_array().map(Vec::len), Some(1));
    for (model, task) in [
        ("demo", "causal_lm"),
        (ft_model.as_str(), "causal_lm"),
        ("digits", "image_classification"),
    ] {
        let m = s.get_ok(&format!("/v1/models/{model}")).await;
        assert_eq!(m["task"], task, "{m}");
    }

    // A browser in a time zone other than the server's (UTC here), to see that times show
    // in the user's zone.
    let mut b = Browser::start(1280, 800, "America/St_Johns").await;

    // A wrong key is refused on the sign-in form; the right one, typed and entered with
    // the keyboard, shows the jobs list.
    b.goto(&format!("{}/ui/", s.url)).await;
    let key_input = b.find("#api-key").await;
    b.type_into(&key_input, &format!("not-a-key{ENTER}")).await;
    b.wait_text("That key was not accepted.", Duration::from_secs(10))
        .await;
    let key_input = b.find("#api-key").await;
    b.script("document.getElementById('api-key').value = '';", json!([]))
        .await;
    b.type_into(&key_input, &format!("{}{ENTER}", s.key)).await;
    b.find(&format!("tr[data-id='{done_id}']")).await;
    let text = b.wait_text("succeeded", Duration::from_secs(10)).await;
    assert!(text.contains("Fine-tuning jobs"), "{text}");
    assert!(text.contains("lora · r 8 · in_proj"), "{text}");
    assert!(text.contains("20,480"), "trainable parameters: {text}");
    let times = b
        .script(
            "const d = new Date(arguments[0] * 1000); \
             const f = (tz) => new Intl.DateTimeFormat(undefined, {month: 'short', \
               day: 'numeric', hour: '2-digit', minute: '2-digit', timeZone: tz}).format(d); \
             return [Intl.DateTimeFormat().resolvedOptions().timeZone, f(undefined), f('UTC')];",
            json!([done["created_at"]]),
        )
        .await;
    assert_eq!(times[0], "America/St_Johns");
    let row = b
        .text(&b.find(&format!("tr[data-id='{done_id}'] td.time")).await)
        .await;
    assert_eq!(json!(row), times[1], "the created time in the user's zone");
    assert_ne!(times[1], times[2]);
    b.screenshot(&shots.join("jobs.png")).await;
    no_page_errors(&b, "jobs").await;

    // The keyboard alone reaches the job (Tab from the top of the page) and opens it (Enter).
    b.script(
        "document.activeElement.blur(); window.scrollTo(0, 0);",
        json!([]),
    )
    .await;
    let mut reached = false;
    for _ in 0..30 {
        b.press(TAB).await;
        let href = b
            .script(
                "return document.activeElement && document.activeElement.getAttribute('href');",
                json!([]),
            )
            .await;
        if href == json!(format!("#/jobs/{done_id}")) {
            reached = true;
            break;
        }
    }
    assert!(reached, "Tab never reached the job's link");
    // The list refreshes every 3 s without taking the focus away.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let focused = b
        .script(
            "return document.activeElement && document.activeElement.getAttribute('href');",
            json!([]),
        )
        .await;
    assert_eq!(
        focused,
        json!(format!("#/jobs/{done_id}")),
        "a refresh took the focus"
    );
    b.press(ENTER).await;
    b.find("#chart-loss").await;
    let hash = b.script("return location.hash;", json!([])).await;
    assert_eq!(hash, json!(format!("#/jobs/{done_id}")));

    // Filter by status (server-side): no running job now.
    open(&b, &s, "/jobs?status=running", "#jobs-empty").await;
    b.wait_text("No running jobs.", Duration::from_secs(10))
        .await;

    // A running job: its loss curve gains points as steps arrive; then cancel it.
    let long = lora_job(&s, &train, &valid, 1000, 25, 200).await;
    let long_id = long["id"].as_str().expect("id").to_string();
    open(&b, &s, &format!("/jobs/{long_id}"), "#chart-loss").await;
    b.wait_text("running", Duration::from_secs(60)).await;
    let first = b
        .wait_script(
            "const n = Number(document.querySelector('#chart-loss').dataset.points); \
             return n >= 5 ? n : 0;",
            "the loss curve's first points",
            Duration::from_secs(60),
        )
        .await
        .as_u64()
        .expect("points");
    // Where the lower charts and the events sit, to check that nothing moves as data comes.
    let layout = "return ['#chart-lr', '#chart-speed', '#job-events'] \
                    .map((c) => document.querySelector(c).getBoundingClientRect().top);";
    let before = b.script(layout, json!([])).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let grown = loop {
        let n = attr_num(&b, "#chart-loss", "data-points").await;
        if n >= first + 10 {
            break n;
        }
        assert!(
            Instant::now() < deadline,
            "the curve stayed at {n} points (started at {first})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        b.script(layout, json!([])).await,
        before,
        "the page moved while the job streamed"
    );
    // The page's series is the API's, step for step.
    let metrics = s
        .get_ok(&format!(
            "/v1/fine_tuning/jobs/{long_id}/metrics?limit=10000"
        ))
        .await;
    let api_steps = metrics["data"].as_array().expect("data").len() as u64;
    assert!(api_steps >= grown, "page {grown} points, API {api_steps}");
    // Live events arrive over the stream (validation every 25 steps).
    b.wait_text("validation loss", Duration::from_secs(60))
        .await;
    b.screenshot(&shots.join("job.png")).await;
    let cancel = b.find("#cancel-job").await;
    b.click(&cancel).await;
    b.wait_script(
        "const s = document.querySelector('#job-status'); \
         return s && s.textContent.includes('cancelled');",
        "the job shown cancelled",
        Duration::from_secs(60),
    )
    .await;
    let job = s.wait_job(&long_id, Duration::from_secs(60)).await;
    assert_eq!(job["status"], "cancelled");
    no_page_errors(&b, "job").await;

    // A phone's width: one column, nothing wider than the screen.
    b.set_viewport(390, 844).await;
    open(&b, &s, &format!("/jobs/{done_id}"), "#chart-loss").await;
    b.wait_text(
        "Download adapter_model.safetensors",
        Duration::from_secs(20),
    )
    .await;
    let overflow = b
        .script(
            "return document.documentElement.scrollWidth - window.innerWidth;",
            json!([]),
        )
        .await;
    if overflow.as_i64().expect("number") > 0 {
        let wide = b
            .script(
                "return [...document.querySelectorAll('body *')] \
                   .filter((e) => e.getBoundingClientRect().right > window.innerWidth + 1) \
                   .slice(0, 8).map((e) => `${e.tagName}.${e.className} ${e.getBoundingClientRect().right}`);",
                json!([]),
            )
            .await;
        panic!("the page is {overflow} px wider than a phone: {wide}");
    }
    b.screenshot(&shots.join("job-phone.png")).await;
    b.set_viewport(1280, 800).await;

    // Upload a file with errors: the progress bar completes and the problems show with
    // their line numbers.
    let bad = tempfile::NamedTempFile::with_suffix(".jsonl").expect("tmp");
    std::fs::write(
        bad.path(),
        "{\"text\": \"fine\"}\nnot json\n{\"prompt\": 7, \"completion\": \"x\"}\n",
    )
    .expect("write");
    open(&b, &s, "/files", "#upload-file").await;
    let input = b.find("#upload-file").await;
    b.type_into(&input, &bad.path().display().to_string()).await;
    b.click(&b.find("#upload-button").await).await;
    let text = b
        .wait_text("is not a valid dataset", Duration::from_secs(20))
        .await;
    assert!(text.contains("line 2: not valid JSON"), "{text}");
    assert!(
        text.contains("line 3: field `prompt` must be a string"),
        "{text}"
    );
    assert_eq!(attr_num(&b, "#upload-progress", "value").await, 100);
    let files = s.get_ok("/v1/files").await;
    let stored = files["data"]
        .as_array()
        .expect("files")
        .iter()
        .find(|f| f["status"] == "error")
        .expect("the bad file is stored");
    b.find(&format!(
        "tr[data-id='{}']",
        stored["id"].as_str().expect("id")
    ))
    .await;
    b.screenshot(&shots.join("files.png")).await;
    no_page_errors(&b, "files").await;

    // A finished search: the trials table sorts, the charts draw every trial.
    let search = post(
        &s,
        "/v1/fine_tuning/searches",
        json!({"model": "demo", "training_file": train, "validation_file": valid,
               "methods": ["lora_in_proj", "lora_out_proj", "D"],
               "trials": {"step1": 3, "step2": 2}, "max_parallel": 1, "seed": 3,
               "hyperparameters": {"n_epochs": 1, "batch_size": 4, "max_seq_length": 24}}),
    )
    .await;
    let search_id = search["id"].as_str().expect("id").to_string();
    let deadline = Instant::now() + Duration::from_secs(240);
    let search = loop {
        let v = s
            .get_ok(&format!("/v1/fine_tuning/searches/{search_id}"))
            .await;
        if v["status"] != "queued" && v["status"] != "running" {
            break v;
        }
        assert!(Instant::now() < deadline, "search not finished: {v}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(search["status"], "succeeded", "{search}");
    let trials = s
        .get_ok(&format!("/v1/fine_tuning/searches/{search_id}/trials"))
        .await;
    let trials = trials["data"].as_array().expect("trials").clone();
    let complete: Vec<&Value> = trials
        .iter()
        .filter(|t| t["status"] == "complete")
        .collect();
    open(&b, &s, &format!("/searches/{search_id}"), "tr[data-trial]").await;
    let rows = b.find_all("tr[data-trial]").await;
    assert_eq!(rows.len(), trials.len());
    assert_eq!(
        attr_num(&b, "#chart-objective", "data-points").await,
        trials.len() as u64
    );
    let lines = attr_num(&b, "#parallel-coordinates", "data-lines").await;
    let shown_step = b
        .script(
            "return document.getElementById('pc-step').value;",
            json!([]),
        )
        .await;
    let in_step = complete
        .iter()
        .filter(|t| Some(t["step"].to_string().as_str()) == shown_step.as_str())
        .count();
    assert_eq!(
        lines, in_step as u64,
        "one line per complete trial of the step"
    );
    // Sort by the objective (ascending): the rows follow the values.
    let sort = b
        .script(
            "const b = [...document.querySelectorAll('button.sort')] \
               .find((x) => x.textContent === 'Objective'); b.click(); return true;",
            json!([]),
        )
        .await;
    assert_eq!(sort, json!(true));
    let order = b
        .script(
            "return [...document.querySelectorAll('tr[data-trial]')].map((r) => Number(r.dataset.trial));",
            json!([]),
        )
        .await;
    let mut want: Vec<&Value> = trials.iter().collect();
    want.sort_by(|a, b| {
        let va = a["value"].as_f64();
        let vb = b["value"].as_f64();
        match (va, vb) {
            (Some(x), Some(y)) => x
                .total_cmp(&y)
                .then(a["number"].as_i64().cmp(&b["number"].as_i64())),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => a["number"].as_i64().cmp(&b["number"].as_i64()),
        }
    });
    let want: Vec<i64> = want
        .iter()
        .map(|t| t["number"].as_i64().expect("n"))
        .collect();
    assert_eq!(order, json!(want));
    let best = search["best"]["value"].as_f64().expect("best");
    let text = b.body_text().await;
    assert!(text.contains("succeeded"), "{text}");
    b.script("window.scrollTo(0, 0);", json!([])).await;
    b.screenshot(&shots.join("search.png")).await;
    no_page_errors(&b, "search").await;
    open(
        &b,
        &s,
        "/searches",
        &format!("a[href='#/searches/{search_id}']"),
    )
    .await;
    assert!(best.is_finite());
    b.screenshot(&shots.join("searches.png")).await;

    // Models and adapters: warm the finished job's adapter into the serving cache.
    open(&b, &s, "/models", "table").await;
    let text = b.wait_text(&ft_model, Duration::from_secs(10)).await;
    assert!(text.contains("images (classifications)"), "digits: {text}");
    assert!(text.contains("text (completions, scores)"), "demo: {text}");
    b.screenshot(&shots.join("models.png")).await;
    open(&b, &s, "/adapters", &format!("tr[data-id='{adapter_id}']")).await;
    let warm = b
        .find(&format!("tr[data-id='{adapter_id}'] td.actions button"))
        .await;
    assert_eq!(b.text(&warm).await, "Warm");
    b.click(&warm).await;
    b.wait_script(
        &format!(
            "return document.getElementById('residency-{adapter_id}').textContent \
             .startsWith('resident');"
        ),
        "the adapter shown resident",
        Duration::from_secs(30),
    )
    .await;
    b.screenshot(&shots.join("adapters.png")).await;
    no_page_errors(&b, "adapters").await;

    // The playground streams the same completion the API gives (greedy).
    let prompt = "Question 3: who wrote Emma?";
    let want = post(
        &s,
        "/v1/completions",
        json!({"model": ft_model, "prompt": prompt, "max_tokens": 12, "temperature": 0}),
    )
    .await;
    let want = want["choices"][0]["text"]
        .as_str()
        .expect("text")
        .to_string();
    open(
        &b,
        &s,
        &format!("/playground?model={ft_model}"),
        "#pg-prompt",
    )
    .await;
    b.script(
        "document.getElementById('pg-max-tokens').value = '12'; \
         document.getElementById('pg-prompt').value = arguments[0];",
        json!([prompt]),
    )
    .await;
    b.click(&b.find("#pg-run").await).await;
    b.wait_script(
        "return document.getElementById('pg-info').textContent.includes('tokens/s');",
        "the completion",
        Duration::from_secs(60),
    )
    .await;
    let shown = b
        .script(
            "return document.getElementById('pg-output').textContent;",
            json!([]),
        )
        .await;
    assert_eq!(shown, json!(format!("{prompt}{want}")));
    b.screenshot(&shots.join("playground.png")).await;

    // …and classifies an image with a vision model as the API does.
    let png = {
        use std::io::Read as _;
        let f = std::fs::File::open(repo_root().join("corpus/digits/digits-5to9.zip"))
            .expect("digits zip");
        let mut z = zip::ZipArchive::new(f).expect("zip");
        let name = (0..z.len())
            .filter_map(|i| {
                z.by_index(i)
                    .ok()
                    .and_then(|e| e.name().ok().map(|n| n.to_string()))
            })
            .find(|n| n.starts_with("val/") && n.ends_with(".png"))
            .expect("a validation image");
        let mut bytes = Vec::new();
        z.by_name(&name)
            .expect("entry")
            .read_to_end(&mut bytes)
            .expect("read");
        bytes
    };
    let image = tempfile::NamedTempFile::with_suffix(".png").expect("tmp");
    std::fs::write(image.path(), &png).expect("write");
    let want = {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
        post(
            &s,
            "/v1/classifications",
            json!({"model": "digits", "images": [b64], "top_k": 3}),
        )
        .await
    };
    let want_top = want["data"][0]["predictions"][0]["label"]
        .as_str()
        .expect("label")
        .to_string();
    open(&b, &s, "/playground?model=digits", "#pg-image").await;
    b.type_into(
        &b.find("#pg-image").await,
        &image.path().display().to_string(),
    )
    .await;
    b.script(
        "document.getElementById('pg-top-k').value = '3';",
        json!([]),
    )
    .await;
    b.click(&b.find("#pg-run").await).await;
    b.find("#pg-output tbody tr").await;
    let rows = b
        .script(
            "return [...document.querySelectorAll('#pg-output tbody tr')] \
               .map((r) => r.cells[0].textContent);",
            json!([]),
        )
        .await;
    assert_eq!(rows.as_array().map(Vec::len), Some(3));
    assert_eq!(rows[0], json!(want_top));
    b.screenshot(&shots.join("playground-vision.png")).await;
    no_page_errors(&b, "playground").await;

    // Everything came from this server.
    let foreign = b
        .script(
            "return performance.getEntriesByType('resource').map((e) => e.name) \
               .filter((u) => !u.startsWith(location.origin) && !u.startsWith('blob:'));",
            json!([]),
        )
        .await;
    assert_eq!(foreign, json!([]), "requests to other hosts");

    // Another tenant's key sees none of it.
    b.click(&b.find("#signout").await).await;
    b.find("#api-key").await;
    b.goto(&format!("{}/ui/#/jobs", s.url)).await;
    let key_input = b.find("#api-key").await;
    b.type_into(&key_input, &format!("{other_key}{ENTER}"))
        .await;
    b.find("#jobs-empty").await;
    b.wait_text("No jobs yet.", Duration::from_secs(10)).await;
    assert!(b.find_all("tr[data-id]").await.is_empty());
    open(&b, &s, &format!("/jobs/{done_id}"), "h1").await;
    b.wait_text("Not found", Duration::from_secs(10)).await;
    open(&b, &s, "/files", "#upload-file").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(b.find_all("tr[data-id]").await.is_empty());
    open(&b, &s, "/searches", "table").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!b.body_text().await.contains(&search_id));
    no_page_errors(&b, "other tenant").await;
}
