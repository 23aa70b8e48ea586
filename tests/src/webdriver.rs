//! A small W3C WebDriver client for a real headless Chromium driven by
//! Debian's `chromedriver`: enough to open a page, find elements by CSS
//! selector, type, click and read text. HTTP/1.1 with JSON over a plain
//! TCP connection to the driver on loopback.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// The element id key of the W3C protocol.
const ELEMENT: &str = "element-6066-11e4-a5ab-5ee28e06ea1b";

/// `chromedriver` and one browser session; both end on drop.
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
}

/// Where Debian installs the driver and the browser.
pub fn chromium_available() -> bool {
    std::path::Path::new("/usr/bin/chromedriver").exists()
        && std::path::Path::new("/usr/bin/chromium").exists()
}

impl Browser {
    /// Starts the driver and a headless browser that accepts the agent's
    /// self-signed certificates (`accept_insecure_certs`).
    pub fn start(accept_insecure_certs: bool) -> Result<Browser> {
        let port = crate::free_port();
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
        };
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
                        "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
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
            if let Ok(v) = found {
                if let Some(id) = v[ELEMENT].as_str() {
                    return Ok(id.to_owned());
                }
            }
            if Instant::now() > deadline {
                bail!("no element {css} within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
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
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw);
        let (_, payload) = text
            .split_once("\r\n\r\n")
            .context("no HTTP body from chromedriver")?;
        // chromedriver answers with Content-Length; a chunked answer would
        // need decoding, which it does not send for these commands.
        let value: Value = serde_json::from_str(payload.trim())
            .with_context(|| format!("chromedriver answered {payload}"))?;
        if let Some(error) = value["value"]["error"].as_str() {
            bail!("{method} {path}: {error}: {}", value["value"]["message"]);
        }
        Ok(value["value"].clone())
    }
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
