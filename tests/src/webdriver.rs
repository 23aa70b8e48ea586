//! A small W3C WebDriver client for a real headless Chromium driven by
//! Debian's `chromedriver`: enough to open a page, find elements by CSS
//! selector, type, click, read text and run a script. HTTP/1.1 with JSON
//! over a plain TCP connection to the driver on loopback.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// The element id key of the W3C protocol.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// `chromedriver` and one browser session; both end on drop.
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
    /// The browser's profile, removed on drop.
    profile: tempfile::TempDir,
}

/// Where Debian installs the driver and the browser.
pub fn chromium_available() -> bool {
    std::path::Path::new("/usr/bin/chromedriver").exists()
        && std::path::Path::new("/usr/bin/chromium").exists()
}

impl Browser {
    /// Starts the driver and a headless browser that accepts the agent's
    /// self-signed certificates (`accept_insecure_certs`). As root, which
    /// the tests are, Chromium runs only without its sandbox; it gets a
    /// profile of its own in a temporary directory.
    pub fn start(accept_insecure_certs: bool) -> Result<Browser> {
        let port = crate::free_port();
        let profile = tempfile::Builder::new()
            .prefix("tollgate-chromium-")
            .tempdir()
            .context("a profile directory for chromium")?;
        let driver = Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chromedriver")?;
        let mut browser = Browser {
            driver,
            port,
            session: String::new(),
            profile,
        };
        let profile_arg = format!("--user-data-dir={}", browser.profile.path().display());
        let deadline = Instant::now() + Duration::from_secs(20);
        while browser.call("GET", "/status", None).is_err() {
            if Instant::now() > deadline {
                bail!("chromedriver did not start");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let created = browser.call(
            "POST",
            "/session",
            Some(json!({
                "capabilities": {"alwaysMatch": {
                    "browserName": "chrome",
                    "acceptInsecureCerts": accept_insecure_certs,
                    "goog:chromeOptions": {
                        "binary": "/usr/bin/chromium",
                        "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", profile_arg]
                    }
                }}
            })),
        )?;
        browser.session = created["sessionId"]
            .as_str()
            .context("no session id")?
            .to_owned();
        Ok(browser)
    }

    /// Opens `url`.
    pub fn open(&self, url: &str) -> Result<()> {
        self.session_call("POST", "/url", Some(json!({ "url": url })))
            .map(drop)
    }

    /// The first element matching `css`, waiting up to `timeout` for it.
    pub fn wait_for(&self, css: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self.session_call(
                "POST",
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            );
            let last = match found {
                Ok(v) => match v[ELEMENT].as_str() {
                    Some(id) => return Ok(id.to_owned()),
                    None => format!("answered {v}"),
                },
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                let url = self.session_call("GET", "/url", None).unwrap_or_default();
                bail!("no element {css} within {timeout:?} on {url}: {last}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The first element matching `css` that is displayed, waiting up to
    /// `timeout` (a hidden input cannot be typed into).
    pub fn wait_for_displayed(&self, css: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let element = self.wait_for(css, remaining)?;
            let shown = self.session_call("GET", &format!("/element/{element}/displayed"), None)?;
            if shown.as_bool() == Some(true) {
                return Ok(element);
            }
            if Instant::now() > deadline {
                bail!("{css} is not displayed within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the page's text contains `wanted`; the text last seen.
    pub fn wait_for_text(&self, wanted: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.page_text().unwrap_or_default();
            if text.contains(wanted) {
                return Ok(text);
            }
            if Instant::now() > deadline {
                bail!("the page never showed {wanted:?}; it shows:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Types `text` into an element.
    pub fn type_into(&self, element: &str, text: &str) -> Result<()> {
        self.session_call(
            "POST",
            &format!("/element/{element}/value"),
            Some(json!({ "text": text })),
        )
        .map(drop)
    }

    /// Clears an input or text area.
    pub fn clear(&self, element: &str) -> Result<()> {
        self.session_call(
            "POST",
            &format!("/element/{element}/clear"),
            Some(json!({})),
        )
        .map(drop)
    }

    /// Clicks an element.
    pub fn click(&self, element: &str) -> Result<()> {
        self.session_call(
            "POST",
            &format!("/element/{element}/click"),
            Some(json!({})),
        )
        .map(drop)
    }

    /// An element's rendered text.
    pub fn text(&self, element: &str) -> Result<String> {
        let v = self.session_call("GET", &format!("/element/{element}/text"), None)?;
        Ok(v.as_str().unwrap_or_default().to_owned())
    }

    /// The whole page's text.
    pub fn page_text(&self) -> Result<String> {
        let body = self.wait_for("body", Duration::from_secs(5))?;
        self.text(&body)
    }

    /// Runs `script` (a function body; `return` gives the value) in the
    /// page, and its return value.
    pub fn execute(&self, script: &str) -> Result<Value> {
        self.session_call(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
    }

    fn session_call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    /// One WebDriver command: its `value`, or the driver's error.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.port,
            body.len()
        )?;
        let payload = read_answer(&mut stream)?;
        let value: Value = serde_json::from_str(payload.trim())
            .with_context(|| format!("chromedriver answered {payload}"))?;
        if let Some(error) = value["value"]["error"].as_str() {
            bail!("{method} {path}: {error}: {}", value["value"]["message"]);
        }
        Ok(value["value"].clone())
    }
}

/// The body of one HTTP/1.1 answer. chromedriver keeps the connection
/// open whatever the request asks, so the body is read by its
/// Content-Length (or its chunks), not to the end of the stream.
fn read_answer(stream: &mut TcpStream) -> Result<String> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let text = String::from_utf8_lossy(&raw).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let header = |name: &str| {
                head.lines().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.trim()
                        .eq_ignore_ascii_case(name)
                        .then(|| v.trim().to_owned())
                })
            };
            if let Some(length) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
                if body.len() >= length {
                    return Ok(body.get(..length).unwrap_or(body).to_owned());
                }
            } else if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
                && (body.contains("\r\n0\r\n") || body.starts_with("0\r\n"))
            {
                return Ok(dechunk(body));
            }
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            let text = String::from_utf8_lossy(&raw).into_owned();
            let (_, body) = text
                .split_once("\r\n\r\n")
                .context("no HTTP answer from chromedriver")?;
            return Ok(body.to_owned());
        }
        raw.extend_from_slice(buf.get(..n).unwrap_or(&[]));
    }
}

/// The body of a chunked HTTP/1.1 answer (sizes in hex, each chunk
/// followed by CRLF, a size of 0 at the end).
fn dechunk(mut rest: &str) -> String {
    let mut body = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16);
        match size {
            Ok(n) if n > 0 && after.len() >= n => {
                body.push_str(after.get(..n).unwrap_or(""));
                rest = after.get(n..).unwrap_or("").trim_start_matches("\r\n");
            }
            _ => break,
        }
    }
    body
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.call("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
