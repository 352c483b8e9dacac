//! A small W3C WebDriver client over reqwest, for the dashboard's browser tests: starts
//! `chromedriver` on a free port, opens a headless Chromium session and drives it (navigate,
//! find, click, type, read, run a script, screenshot). A handful of endpoints is all the tests
//! need, so no WebDriver crate is pulled in.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The key W3C WebDriver uses for an element reference.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in names {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
}

#[derive(Clone, Debug)]
pub struct Element(String);

/// Fails the test on a WebDriver error answer (a stale element, one that cannot be clicked).
fn assert_ok(value: &Value, what: &str) {
    if let Some(err) = value.get("error") {
        panic!("webdriver {what}: {err}: {}", value["message"]);
    }
}

impl Browser {
    /// Starts chromedriver and a headless Chromium window of `width` × `height` whose time
    /// zone is `tz` (an IANA name). Panics with the install command when either program is
    /// missing (scripts/test.sh installs both).
    pub async fn start(width: u32, height: u32, tz: &str) -> Browser {
        let driver_exe = find_program(&["chromedriver"]).expect(
            "chromedriver not found: install Debian's chromium and chromium-driver \
             (scripts/test.sh does when they are absent)",
        );
        let chromium = std::env::var("MOLT_TEST_CHROMIUM")
            .ok()
            .map(PathBuf::from)
            .or_else(|| find_program(&["chromium", "chromium-browser", "google-chrome"]))
            .expect("chromium not found: apt-get install chromium chromium-driver");
        let port = super::free_port();
        let driver = Command::new(driver_exe)
            .arg(format!("--port={port}"))
            .env("TZ", tz)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = http.get(format!("{base}/status")).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--hide-scrollbars",
                         "--force-device-scale-factor=1",
                         format!("--window-size={width},{height}")],
            },
        }}});
        let res: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .expect("new session")
            .json()
            .await
            .expect("session json");
        let session = res["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {res}"))
            .to_string();
        let mut b = Browser {
            driver,
            base,
            session,
            http,
        };
        b.set_viewport(width, height).await;
        b
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{}", self.base, self.session, path);
        let mut req = self.http.request(method, url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res: Value = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("webdriver {path}: {e}"))
            .json()
            .await
            .unwrap_or_else(|e| panic!("webdriver {path}: {e}"));
        res["value"].clone()
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.cmd(reqwest::Method::POST, path, Some(body)).await
    }

    async fn get(&self, path: &str) -> Value {
        self.cmd(reqwest::Method::GET, path, None).await
    }

    /// Resizes the window so that the page's viewport (not the window) is `width` × `height`.
    pub async fn set_viewport(&mut self, width: u32, height: u32) {
        self.post("/window/rect", json!({"width": width, "height": height}))
            .await;
        let inner = self
            .script("return [window.innerWidth, window.innerHeight];", json!([]))
            .await;
        let dw = width as i64 - inner[0].as_i64().unwrap_or(width as i64);
        let dh = height as i64 - inner[1].as_i64().unwrap_or(height as i64);
        if dw != 0 || dh != 0 {
            self.post(
                "/window/rect",
                json!({"width": width as i64 + dw, "height": height as i64 + dh}),
            )
            .await;
        }
    }

    pub async fn goto(&self, url: &str) {
        self.post("/url", json!({"url": url})).await;
    }

    /// Runs `body` (a function body: `return …`) in the page with `args`.
    pub async fn script(&self, body: &str, args: Value) -> Value {
        let v = self
            .post("/execute/sync", json!({"script": body, "args": args}))
            .await;
        assert_ok(&v, "script");
        v
    }

    /// The first element matching `css`, if any, now.
    pub async fn try_find(&self, css: &str) -> Option<Element> {
        let v = self
            .post("/element", json!({"using": "css selector", "value": css}))
            .await;
        v.get(ELEMENT_KEY)
            .and_then(Value::as_str)
            .map(|s| Element(s.into()))
    }

    /// Calls `probe` every `every` until it gives a value; fails the test after `timeout`
    /// with `what` and the page's text.
    async fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        every: Duration,
        mut probe: impl AsyncFnMut() -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = probe().await {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {timeout:?}; the page shows:\n{}",
                self.body_text().await
            );
            tokio::time::sleep(every).await;
        }
    }

    /// Waits (up to `timeout`) for an element matching `css`.
    pub async fn find_within(&self, css: &str, timeout: Duration) -> Element {
        let what = format!("no element {css}");
        self.wait_for(&what, timeout, Duration::from_millis(100), async || {
            self.try_find(css).await
        })
        .await
    }

    pub async fn find(&self, css: &str) -> Element {
        self.find_within(css, Duration::from_secs(15)).await
    }

    pub async fn find_all(&self, css: &str) -> Vec<Element> {
        let v = self
            .post("/elements", json!({"using": "css selector", "value": css}))
            .await;
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e.get(ELEMENT_KEY).and_then(Value::as_str))
                    .map(|s| Element(s.into()))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub async fn click(&self, e: &Element) {
        let v = self
            .post(&format!("/element/{}/click", e.0), json!({}))
            .await;
        assert_ok(&v, "click");
    }

    /// Types `text` into `e` (for a file input: the file's path).
    pub async fn type_into(&self, e: &Element, text: &str) {
        let v = self
            .post(&format!("/element/{}/value", e.0), json!({"text": text}))
            .await;
        assert_ok(&v, "type");
    }

    /// Presses and releases each key of `keys` in turn (WebDriver's key codes for special
    /// keys: Tab is `\u{E004}`, Enter `\u{E007}`), on whatever has the focus.
    pub async fn press(&self, keys: &str) {
        let mut actions = Vec::new();
        for k in keys.chars() {
            actions.push(json!({"type": "keyDown", "value": k.to_string()}));
            actions.push(json!({"type": "keyUp", "value": k.to_string()}));
        }
        let v = self
            .post(
                "/actions",
                json!({"actions": [{"type": "key", "id": "keyboard", "actions": actions}]}),
            )
            .await;
        assert_ok(&v, "keys");
    }

    pub async fn text(&self, e: &Element) -> String {
        self.get(&format!("/element/{}/text", e.0))
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub async fn attr(&self, e: &Element, name: &str) -> Option<String> {
        self.get(&format!("/element/{}/attribute/{name}", e.0))
            .await
            .as_str()
            .map(String::from)
    }

    pub async fn body_text(&self) -> String {
        self.script(
            "return document.body ? document.body.innerText : '';",
            json!([]),
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    /// Waits until the page's visible text contains `needle`; returns the text.
    pub async fn wait_text(&self, needle: &str, timeout: Duration) -> String {
        let what = format!("the page never showed {needle:?}");
        self.wait_for(&what, timeout, Duration::from_millis(150), async || {
            Some(self.body_text().await).filter(|t| t.contains(needle))
        })
        .await
    }

    /// Waits until `script` (a function body) returns something truthy; returns it.
    pub async fn wait_script(&self, script: &str, what: &str, timeout: Duration) -> Value {
        self.wait_for(what, timeout, Duration::from_millis(150), async || {
            let v = self.script(script, json!([])).await;
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            truthy.then_some(v)
        })
        .await
    }

    /// Saves a PNG of the viewport to `path`.
    pub async fn screenshot(&self, path: &Path) {
        use base64::Engine as _;
        let v = self.get("/screenshot").await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("screenshot base64"))
            .expect("screenshot png");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot dir");
        }
        std::fs::write(path, png).expect("write screenshot");
    }

    /// Messages the page wrote to the console at level SEVERE (errors), and clears them.
    pub async fn console_errors(&self) -> Vec<String> {
        let v = self
            .script(
                "const e = window.__moltErrors || []; window.__moltErrors = []; return e;",
                json!([]),
            )
            .await;
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends the session first (Chromium exits with it), synchronously: a plain HTTP/1.1
        // DELETE, since Drop cannot await.
        use std::io::{Read as _, Write as _};
        let addr = self.base.trim_start_matches("http://").to_string();
        if let Ok(mut s) = std::net::TcpStream::connect(&addr) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = write!(
                s,
                "DELETE /session/{} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n\
                 Connection: close\r\n\r\n",
                self.session
            );
            let _ = s.read_to_end(&mut Vec::new());
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
