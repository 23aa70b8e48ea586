#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::*;

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    Config::from_toml(Path::new("t.toml"), text)
}

fn errors(text: &str) -> Vec<String> {
    lines(parse(text).expect_err("config should be rejected"))
}

/// Each error as printed.
fn lines(errors: ConfigErrors) -> Vec<String> {
    errors.0.iter().map(|e| e.to_string()).collect()
}

const GOOD: &str = r#"
[agent]
control_socket = "/tmp/ctl.sock"
metrics_listen = "127.0.0.1:9187"
shutdown_grace = "5s"
idle_timeout = "10m"

[[target]]
name = "orders-db"
address = "10.0.0.5"
ports = [5432]
protocol = "postgres"

[[target]]
name = "analytics"
address = "10.1.0.0/16"
ports = ["5432-5439", 6432]
protocol = "postgres"

[[target]]
name = "cache"
address = "cache.internal"
ports = [6379]
protocol = "tcp"

[[listener]]
listen = "127.0.0.1:15432"
target = "orders-db"

[[listener]]
listen = "127.0.0.1:15433"
target = "analytics"
upstream = "10.1.2.3:5433"

[[cgroup]]
path = "system.slice/actions.runner.service"
unlisted = "deny"
"#;

#[test]
fn parses_a_complete_file() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.agent.control_socket, Path::new("/tmp/ctl.sock"));
    assert_eq!(
        c.agent.metrics_listen,
        Some("127.0.0.1:9187".parse().unwrap())
    );
    assert_eq!(c.agent.shutdown_grace, Duration::from_secs(5));
    assert_eq!(c.agent.idle_timeout, Duration::from_secs(600));
    assert_eq!(
        c.agent.connect_timeout,
        Duration::from_secs(5),
        "default kept"
    );
    assert_eq!(c.targets.len(), 3);
    let l = &c.listeners[0];
    assert_eq!(
        l.upstream,
        Upstream {
            host: "10.0.0.5".into(),
            port: 5432
        }
    );
    assert_eq!(c.listeners[1].upstream.to_string(), "10.1.2.3:5433");
    assert_eq!(c.cgroups[0].unlisted, UnlistedPolicy::Deny);
    assert_eq!(c.targets.get("analytics").unwrap().ports.len(), 2);
}

#[test]
fn worker_threads_default_to_half_the_cpus_and_are_bounded() {
    let c = parse("").unwrap();
    assert_eq!(c.agent.worker_threads, None);
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(c.agent.session_threads(), (cpus / 2).max(1));
    let c = parse("[agent]\nworker_threads = 3\n").unwrap();
    assert_eq!(c.agent.session_threads(), 3);
    let e = errors("[agent]\nworker_threads = 0\n");
    assert_eq!(
        e,
        vec!["t.toml:2:18: worker_threads must be between 1 and 1024"]
    );
}

#[test]
fn empty_file_is_valid_with_defaults() {
    let c = parse("").unwrap();
    assert!(c.targets.is_empty());
    assert_eq!(c.agent.control_socket, Path::new(DEFAULT_CONTROL_SOCKET));
}

#[test]
fn syntax_error_has_line_and_column() {
    let e = errors("[agent]\nmetrics_listen = \n");
    assert_eq!(e.len(), 1);
    assert!(e[0].starts_with("t.toml:2:"), "{e:?}");
}

#[test]
fn unknown_field_is_reported_where_it_is() {
    let e = errors("[agent]\ncontrol_sockett = \"/x\"\n");
    assert!(e[0].starts_with("t.toml:2:1:"), "{e:?}");
    assert!(e[0].contains("control_sockett"), "{e:?}");
}

#[test]
fn listener_naming_unknown_target_lists_known_ones() {
    let text =
        "[[target]]\nname = \"a\"\naddress = \"10.0.0.1\"\nports = [1]\nprotocol = \"tcp\"\n\
                [[listener]]\nlisten = \"127.0.0.1:1\"\ntarget = \"b\"\n";
    let e = errors(text);
    assert_eq!(
        e,
        vec!["t.toml:8:10: listener names target \"b\", which is not defined; known targets: a"]
    );
}

#[test]
fn every_error_is_collected() {
    let text = r#"
[agent]
idle_timeout = "soon"
metrics_listen = "nowhere"

[[target]]
name = "x y"
address = "10.0.0.0/33"
ports = [0, "9-3"]
protocol = "redis"
"#;
    let e = errors(text);
    assert_eq!(e.len(), 7, "{e:#?}");
    assert!(e
        .iter()
        .any(|m| m.starts_with("t.toml:3:16: idle_timeout \"soon\" is not a duration")));
    assert!(e
        .iter()
        .any(|m| m.starts_with("t.toml:4:18: metrics_listen")));
    assert!(e.iter().any(|m| m.contains("target name \"x y\"")));
    assert!(e.iter().any(|m| m.contains("not a valid CIDR")));
    assert!(e.iter().any(|m| m.contains("0 is not a port")));
    assert!(e.iter().any(|m| m.contains("runs backwards")));
    assert!(e.iter().any(|m| m.contains("unknown protocol \"redis\"")));
}

#[test]
fn duplicate_target_and_listener_are_rejected() {
    let text = r#"
[[target]]
name = "a"
address = "10.0.0.1"
ports = [1]
protocol = "tcp"
[[target]]
name = "a"
address = "10.0.0.2"
ports = [1]
protocol = "tcp"
[[listener]]
listen = "127.0.0.1:7000"
target = "a"
[[listener]]
listen = "127.0.0.1:7000"
target = "a"
"#;
    let e = errors(text);
    assert!(e.iter().any(|m| m.contains("defined twice")), "{e:?}");
    assert!(
        e.iter().any(|m| m.contains("used by two listeners")),
        "{e:?}"
    );
}

#[test]
fn listener_for_a_network_needs_an_upstream() {
    let text = "[[target]]\nname = \"n\"\naddress = \"10.0.0.0/8\"\nports = [5432]\nprotocol = \"postgres\"\n\
                [[listener]]\nlisten = \"127.0.0.1:1\"\ntarget = \"n\"\n";
    let e = errors(text);
    assert!(e[0].contains("needs upstream = \"HOST:PORT\""), "{e:?}");
}

#[test]
fn upstream_accepts_hosts_and_v6() {
    assert_eq!(
        raw_upstream("db.internal:5432"),
        Ok(Upstream {
            host: "db.internal".into(),
            port: 5432
        })
    );
    assert_eq!(
        raw_upstream("[::1]:5432").unwrap().to_string(),
        "[::1]:5432"
    );
    assert!(raw_upstream("db.internal").is_err());
    assert!(raw_upstream("db internal:1").is_err());
}

fn raw_upstream(s: &str) -> Result<Upstream, String> {
    let text = format!(
        "[[target]]\nname = \"n\"\naddress = \"10.0.0.0/8\"\nports = [5432]\nprotocol = \"tcp\"\n\
         [[listener]]\nlisten = \"127.0.0.1:1\"\ntarget = \"n\"\nupstream = \"{s}\"\n"
    );
    parse(&text)
        .map(|c| c.listeners[0].upstream.clone())
        .map_err(|e| e.to_string())
}

#[test]
fn target_matching_by_network_port_and_host() {
    let c = parse(GOOD).unwrap();
    let no_dns = |_: &str| Vec::new();
    let find = |s: &str| {
        c.targets
            .find(s.parse::<SocketAddr>().unwrap(), no_dns)
            .map(|t| t.name.clone())
    };
    assert_eq!(find("10.0.0.5:5432").as_deref(), Some("orders-db"));
    assert_eq!(find("10.0.0.5:5433"), None, "port outside the target");
    assert_eq!(find("10.1.200.7:5436").as_deref(), Some("analytics"));
    assert_eq!(find("10.1.200.7:6432").as_deref(), Some("analytics"));
    assert_eq!(find("10.2.0.1:5432"), None);
    assert_eq!(
        find("[::ffff:10.0.0.5]:5432").as_deref(),
        Some("orders-db"),
        "v4-mapped addresses match IPv4 targets"
    );
    let dns = |h: &str| {
        if h == "cache.internal" {
            vec!["10.9.9.9".parse().unwrap()]
        } else {
            vec![]
        }
    };
    let t = c
        .targets
        .find("10.9.9.9:6379".parse().unwrap(), dns)
        .unwrap();
    assert_eq!(t.name, "cache");
}

#[test]
fn port_ranges() {
    assert_eq!(
        PortRange::parse("5432"),
        Ok(PortRange {
            first: 5432,
            last: 5432
        })
    );
    assert!(PortRange::parse("1-65535").unwrap().contains(80));
    assert!(PortRange::parse("65536").is_err());
    assert!(PortRange::parse("a-b").is_err());
}

#[test]
fn line_column_counts_characters() {
    let text = "ab\ncdé f";
    assert_eq!(line_column(text, 0), (1, 1));
    assert_eq!(line_column(text, 3), (2, 1));
    assert_eq!(line_column(text, text.find('f').unwrap()), (2, 5));
    assert_eq!(line_column(text, 999), (2, 6));
}

#[test]
fn cgroup_paths_cannot_escape() {
    let e = errors("[[cgroup]]\npath = \"../../etc\"\n");
    assert!(e[0].contains("must not contain"), "{e:?}");
    let e = errors("[[cgroup]]\npath = \"ci\"\nunlisted = \"block\"\n");
    assert!(e[0].contains("use \"pass\" or \"deny\""), "{e:?}");
}

#[test]
fn redirect_section_defaults_and_errors() {
    let c = parse("[redirect]\n").unwrap();
    let r = c.redirect.unwrap();
    assert_eq!(r.port, 15000);
    assert_eq!(r.pin_dir, Path::new("/sys/fs/bpf/tollgate"));
    assert_eq!(r.exec_unlisted, UnlistedPolicy::Pass);
    assert!(r.job_timeline, "the job timeline is on by default");
    let off = parse("[redirect]\njob_timeline = false\n").unwrap();
    assert!(!off.redirect.unwrap().job_timeline);
    assert!(parse("[redirect]\njob_timeline = \"no\"\n").is_err());
    assert!(
        parse("").unwrap().redirect.is_none(),
        "no section, no redirect"
    );

    let c = parse("[redirect]\nport = 16000\nexec_cgroup = \"/ci/exec\"\nexec_unlisted = \"deny\"\nresolvers = [\"10.0.0.2\"]\n").unwrap();
    let r = c.redirect.unwrap();
    assert_eq!(
        (r.port, r.exec_cgroup.to_str(), r.exec_unlisted),
        (16000, Some("ci/exec"), UnlistedPolicy::Deny)
    );
    assert_eq!(
        r.resolvers,
        vec!["10.0.0.2".parse::<std::net::IpAddr>().unwrap()]
    );

    let e = errors("[redirect]\nport = 70000\npin_dir = \"bpf\"\nresolvers = [\"dns\"]\n");
    assert_eq!(e.len(), 3, "{e:?}");
    assert!(e[0].starts_with("t.toml:2:8: redirect.port"), "{e:?}");
}

#[test]
fn protect_section_modes_targets_and_errors() {
    let base = "[redirect]\n[[target]]\nname = \"a\"\naddress = \"10.0.0.1\"\nports = [5432]\nprotocol = \"postgres\"\n[[target]]\nname = \"b\"\naddress = \"10.0.0.2\"\nports = [5432]\nprotocol = \"postgres\"\n";
    assert!(parse(base).unwrap().protect.is_none(), "off when absent");

    let p = parse(&format!("{base}[protect]\nmode = \"audit\"\n"))
        .unwrap()
        .protect
        .unwrap();
    assert_eq!(p.mode, ProtectMode::Audit);
    assert!(p.covers("a") && p.covers("b"), "every target by default");

    let p = parse(&format!(
        "{base}[protect]\nmode = \"deny\"\ntargets = [\"b\"]\n"
    ))
    .unwrap()
    .protect
    .unwrap();
    assert_eq!(p.mode, ProtectMode::Deny);
    assert!(!p.covers("a") && p.covers("b"));

    let e = errors(&format!(
        "{base}[protect]\nmode = \"block\"\ntargets = [\"c\"]\n"
    ));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].contains("use \"audit\" or \"deny\""), "{e:?}");
    let e = errors(&format!(
        "{base}[protect]\nmode = \"deny\"\ntargets = [\"c\"]\n"
    ));
    assert!(e[0].contains("no [[target]] is called"), "{e:?}");
    assert!(e[0].starts_with("t.toml:14:"), "{e:?}");
    let e = errors("[protect]\nmode = \"deny\"\n");
    assert!(e[0].contains("[protect] needs [redirect]"), "{e:?}");
    let e = errors(&format!("{base}[protect]\n"));
    assert!(e[0].contains("mode"), "{e:?}");
}

#[test]
fn upstream_tls_modes() {
    let base = "[[target]]\nname = \"t\"\naddress = \"10.0.0.1\"\nports = [5432]\nprotocol = \"postgres\"\n";
    assert_eq!(
        parse(base).unwrap().targets.get("t").unwrap().tls,
        UpstreamTls::Prefer
    );
    let c = parse(&format!(
        "{base}tls = \"verify-full\"\ntls_ca_file = \"/etc/ca.pem\"\ntls_server_name = \"db\"\n"
    ))
    .unwrap();
    assert_eq!(
        c.targets.get("t").unwrap().tls,
        UpstreamTls::VerifyFull {
            ca_file: "/etc/ca.pem".into(),
            server_name: Some("db".into())
        }
    );
    let e = errors(&format!("{base}tls = \"verify-full\"\n"));
    assert!(e[0].contains("needs tls_ca_file"), "{e:?}");
    let e = errors(&format!("{base}tls = \"require\"\ntls_ca_file = \"/x\"\n"));
    assert!(
        e[0].contains("applies only with tls = \"verify-full\""),
        "{e:?}"
    );
    let e = errors(&format!("{base}tls = \"always\"\n"));
    assert!(e[0].starts_with("t.toml:6:7:"), "{e:?}");
}

#[test]
fn record_raw_is_a_per_target_boolean() {
    let base = "[[target]]\nname = \"t\"\naddress = \"10.0.0.1\"\nports = [5432]\nprotocol = \"postgres\"\n";
    assert!(!parse(base).unwrap().targets.get("t").unwrap().record_raw);
    let c = parse(&format!("{base}record_raw = true\n")).unwrap();
    assert!(c.targets.get("t").unwrap().record_raw);
    let e = errors(&format!("{base}record_raw = \"yes\"\n"));
    assert!(e[0].starts_with("t.toml:6:14:"), "{e:?}");
}

#[test]
fn client_tls_defaults_off_and_parses_terminate() {
    let c = parse("").unwrap();
    assert_eq!(c.agent.client_tls, ClientTls::Off);
    assert_eq!(c.agent.tls_dir, Path::new("/var/lib/tollgate/tls"));
    let c = parse("[agent]\nclient_tls = \"terminate\"\ntls_dir = \"/tmp/tg-tls\"\n").unwrap();
    assert_eq!(c.agent.client_tls, ClientTls::Terminate);
    assert_eq!(c.agent.tls_dir, Path::new("/tmp/tg-tls"));
    let e = errors("[agent]\nclient_tls = \"on\"\n");
    assert!(e[0].starts_with("t.toml:2:"), "{e:?}");
    assert!(e[0].contains("\"off\" or \"terminate\""), "{e:?}");
    let e = errors("[agent]\ntls_dir = \"\"\n");
    assert!(e[0].contains("tls_dir is empty"), "{e:?}");
}

#[test]
fn recording_durability_and_failure_settings() {
    let c =
        parse("[agent]\nrecording_fsync = \"every-event\"\nrecording_on_failure = \"continue\"\n")
            .unwrap();
    assert_eq!(c.agent.recording_fsync, RecordingFsync::EveryEvent);
    assert_eq!(c.agent.recording_on_failure, RecordingFailure::Continue);
    let c = parse("[agent]\nrecording_fsync = \"250ms\"\n").unwrap();
    assert_eq!(
        c.agent.recording_fsync,
        RecordingFsync::Interval(Duration::from_millis(250))
    );
    assert_eq!(
        parse("").unwrap().agent.recording_on_failure,
        RecordingFailure::Refuse
    );
    let e = errors("[agent]\nrecording_fsync = \"sometimes\"\nrecording_on_failure = \"panic\"\n");
    assert_eq!(e.len(), 2, "{e:?}");
}

#[test]
fn recording_signing_and_retention_settings() {
    let c = parse(
        "[agent]\nrecording_signing_key = \"/etc/tollgate/recording.key\"\nrecording_retention_days = 30\nrecording_max_total_size = \"10GiB\"\n",
    )
    .unwrap();
    assert_eq!(
        c.agent.recording_signing_key.as_deref(),
        Some(Path::new("/etc/tollgate/recording.key"))
    );
    assert_eq!(
        c.agent.recording_retention,
        Some(Duration::from_secs(30 * 86_400))
    );
    assert_eq!(c.agent.recording_max_total_size, Some(10 << 30));
    let c = parse("[agent]\nrecording_max_total_size = 1048576\n").unwrap();
    assert_eq!(c.agent.recording_max_total_size, Some(1 << 20));
    let off = parse("").unwrap().agent;
    assert_eq!(off.recording_signing_key, None);
    assert_eq!(off.recording_retention, None);
    assert_eq!(off.recording_max_total_size, None);

    let e = errors(
        "[agent]\nrecording_signing_key = \"\"\nrecording_retention_days = 0\nrecording_max_total_size = \"ten gigs\"\n",
    );
    assert_eq!(e.len(), 3, "{e:?}");
    assert!(
        e[0].starts_with("t.toml:2:25: recording_signing_key is empty"),
        "{e:?}"
    );
    assert!(
        e[1].starts_with("t.toml:3:28: recording_retention_days"),
        "{e:?}"
    );
    assert!(
        e[2].starts_with("t.toml:4:28: recording_max_total_size: \"ten gigs\" is not a size"),
        "{e:?}"
    );
    let e = errors("[agent]\nrecording_max_total_size = -1\n");
    assert!(e[0].contains("negative"), "{e:?}");
    let e = errors("[agent]\nrecording_max_total_size = \"0GiB\"\n");
    assert!(e[0].contains("more than zero"), "{e:?}");
}

#[test]
fn sizes_take_decimal_and_binary_units() {
    for (text, bytes) in [
        ("4096", 4096),
        ("4096B", 4096),
        ("1KB", 1000),
        ("1kib", 1024),
        ("1K", 1024),
        ("500 MB", 500_000_000),
        ("2MiB", 2 << 20),
        ("10GiB", 10 << 30),
        ("3GB", 3_000_000_000),
        ("1TiB", 1 << 40),
        (" 7 t ", 7 << 40),
    ] {
        assert_eq!(parse_size(text), Ok(bytes), "{text}");
    }
    for bad in [
        "",
        "GiB",
        "1.5GiB",
        "10 gigs",
        "-1",
        "99999999999999999999",
        "20000000TiB",
    ] {
        assert!(parse_size(bad).is_err(), "{bad}");
    }
}

#[test]
fn approvals_settings_and_reviewer_groups() {
    let c = parse("").unwrap();
    assert_eq!(
        c.agent.approvals_socket,
        Path::new("/run/tollgate/approvals.sock")
    );
    assert_eq!(c.agent.approvals_socket_mode, 0o666);
    assert_eq!(
        c.agent.approvals_store,
        Path::new("/var/lib/tollgate/approvals.redb")
    );
    assert!(c.reviewers.is_empty());
    let c = parse(
        "[agent]\napprovals_socket = \"/run/t/a.sock\"\napprovals_socket_mode = \"0660\"\napprovals_socket_group = \"dba\"\napprovals_store = \"/srv/t/grants.redb\"\n\n[reviewers.oncall]\nusers = [\"alice\", \"bob\", \"alice\"]\n",
    )
    .unwrap();
    assert_eq!(c.agent.approvals_socket, Path::new("/run/t/a.sock"));
    assert_eq!(c.agent.approvals_socket_mode, 0o660);
    assert_eq!(c.agent.approvals_socket_group.as_deref(), Some("dba"));
    assert_eq!(c.agent.approvals_store, Path::new("/srv/t/grants.redb"));
    assert_eq!(c.reviewers["oncall"], ["alice", "bob"]);

    #[rustfmt::skip]
    let cases = [
        ("[agent]\napprovals_socket = \"rel.sock\"\n", "t.toml:2:20: approvals_socket must be an absolute path"),
        ("[agent]\napprovals_store = \"\"\n", "t.toml:2:19: approvals_store must be an absolute path"),
        ("[agent]\napprovals_socket_mode = \"0400\"\n", "t.toml:2:25: approvals_socket_mode \"0400\" is not a file mode"),
        ("[agent]\napprovals_socket_mode = \"rw\"\n", "t.toml:2:25: approvals_socket_mode \"rw\" is not a file mode"),
        ("[agent]\napprovals_socket_group = \"a:b\"\n", "t.toml:2:26: approvals_socket_group must be a Unix group name"),
        ("[reviewers.oncall]\nusers = []\n", "t.toml:2:9: [reviewers.oncall] users is empty"),
        ("[reviewers.oncall]\nusers = [\"a,b\"]\n", "t.toml:2:10: \"a,b\" is not a user name"),
        ("[reviewers.oncall]\nmembers = [\"a\"]\n", "unknown field `members`"),
    ];
    for (text, want) in cases {
        let got = errors(text).join("\n");
        assert!(got.contains(want), "for\n{text}\nwant: {want}\ngot:  {got}");
    }
}

#[test]
fn notify_entries_parse_with_their_defaults() {
    let c = parse(
        r#"
[[notify]]
kind = "webhook"
url = "https://hooks.example.com/tollgate?x=1"
headers = { authorization = "Bearer abc" }
link = "https://review.example.com/"

[[notify]]
kind = "slack"
url = "http://127.0.0.1:8080/services/T/B/X"
events = ["requested", "approved", "denied", "expired", "cancelled", "aborted", "denied"]
"#,
    )
    .unwrap();
    use crate::approval::RequestEventKind as E;
    assert_eq!(c.notify.len(), 2, "{:?}", c.notify);
    let (webhook, slack) = (&c.notify[0], &c.notify[1]);
    assert_eq!(webhook.kind, NotifyKind::Webhook);
    assert_eq!(webhook.host(), "hooks.example.com");
    assert_eq!(
        webhook.headers,
        vec![("authorization".to_owned(), "Bearer abc".to_owned())]
    );
    assert_eq!(webhook.link.as_deref(), Some("https://review.example.com/"));
    assert_eq!(webhook.events, vec![E::Requested]);
    assert_eq!(slack.kind, NotifyKind::Slack);
    assert_eq!(slack.url.port_u16(), Some(8080));
    // Duplicates count once.
    assert_eq!(slack.events.len(), 6);
    assert!(parse("").unwrap().notify.is_empty());
}

#[test]
fn notify_errors_name_the_field_and_what_is_allowed() {
    let e = errors("[[notify]]\nkind = \"email\"\nurl = \"https://h.example.com/\"\n");
    assert!(e[0].contains("t.toml:2:"), "{e:?}");
    assert!(
        e[0].contains("notify kind \"email\" is not known; use \"webhook\" or \"slack\""),
        "{e:?}"
    );

    for (url, why) in [
        (
            "ftp://h.example.com/x",
            "must start with http:// or https://",
        ),
        ("hooks.example.com/x", "must start with http:// or https://"),
        ("https://", "is not a URL"),
        (
            "https://user:pw@h.example.com/",
            "must not carry a user name or password",
        ),
        ("not a url at all", "must start with http:// or https://"),
        ("https://exa mple.com/", "is not a URL"),
    ] {
        let e = errors(&format!(
            "[[notify]]\nkind = \"webhook\"\nurl = \"{url}\"\n"
        ));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("t.toml:3:"), "{e:?}");
        assert!(e[0].contains(why), "{url}: {e:?}");
    }

    let e = errors(
        "[[notify]]\nkind = \"slack\"\nurl = \"https://h.example.com/\"\nevents = [\"requested\", \"edited\"]\n",
    );
    assert!(e[0].contains("notify event \"edited\" is not known; use requested, approved, denied, expired, cancelled, aborted"), "{e:?}");

    let e = errors(
        "[[notify]]\nkind = \"slack\"\nurl = \"https://h.example.com/\"\nlink = \"review page\"\n",
    );
    assert!(
        e[0].contains("notify link \"review page\" must be an http:// or https:// URL"),
        "{e:?}"
    );

    let e = errors("[[notify]]\nkind = \"webhook\"\nurl = \"https://h.example.com/\"\nheaders = { \"bad header\" = \"x\" }\n");
    assert!(e[0].contains("not a valid HTTP header name"), "{e:?}");

    let e = errors(
        "[[notify]]\nkind = \"webhook\"\nurl = \"https://h.example.com/\"\nsecret = \"x\"\n",
    );
    assert!(e[0].contains("unknown field `secret`"), "{e:?}");
}

#[test]
fn the_reviewer_api_over_tls_needs_a_certificate_and_a_key() {
    let c = parse("").unwrap();
    assert_eq!(c.agent.approvals_listen, None);
    assert_eq!(
        c.agent.approvals_tokens,
        Path::new("/etc/tollgate/reviewer-tokens")
    );
    let c = parse(
        "[agent]\napprovals_listen = \"0.0.0.0:8443\"\napprovals_tls_cert = \"/etc/tollgate/api.pem\"\napprovals_tls_key = \"/etc/tollgate/api-key.pem\"\napprovals_tokens = \"/srv/t/tokens\"\n",
    )
    .unwrap();
    assert_eq!(
        c.agent.approvals_listen,
        Some("0.0.0.0:8443".parse().unwrap())
    );
    assert_eq!(
        c.agent.approvals_tls_cert.as_deref(),
        Some(Path::new("/etc/tollgate/api.pem"))
    );
    assert_eq!(
        c.agent.approvals_tls_key.as_deref(),
        Some(Path::new("/etc/tollgate/api-key.pem"))
    );
    assert_eq!(c.agent.approvals_tokens, Path::new("/srv/t/tokens"));

    #[rustfmt::skip]
    let cases = [
        ("[agent]\napprovals_listen = \"0.0.0.0:8443\"\n", "t.toml:2:20: approvals_listen serves the reviewer API over TLS only: set approvals_tls_cert and approvals_tls_key"),
        ("[agent]\napprovals_listen = \"0.0.0.0:8443\"\napprovals_tls_cert = \"/c.pem\"\n", "t.toml:2:20: approvals_listen serves the reviewer API over TLS only"),
        ("[agent]\napprovals_listen = \"8443\"\napprovals_tls_cert = \"/c.pem\"\napprovals_tls_key = \"/k.pem\"\n", "t.toml:2:20: approvals_listen \"8443\" is not an address"),
        ("[agent]\napprovals_tls_cert = \"/c.pem\"\n", "t.toml:2:22: approvals_tls_cert is set but approvals_listen is not"),
        ("[agent]\napprovals_listen = \"0.0.0.0:8443\"\napprovals_tls_cert = \"c.pem\"\napprovals_tls_key = \"/k.pem\"\n", "t.toml:3:22: approvals_tls_cert must be an absolute path"),
        ("[agent]\napprovals_tokens = \"tokens\"\n", "t.toml:2:20: approvals_tokens must be an absolute path"),
    ];
    for (text, want) in cases {
        let got = errors(text).join("\n");
        assert!(got.contains(want), "for\n{text}\nwant: {want}\ngot:  {got}");
    }
}

/// An SSH target's files: a root-only key and a known-hosts file.
fn ssh_files() -> (tempfile::TempDir, String) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "not parsed at load").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let known = dir.path().join("known_hosts");
    std::fs::write(&known, "").unwrap();
    let target = format!(
        "[[target]]\nname = \"web\"\naddress = \"10.0.0.5\"\nports = [22]\nprotocol = \"ssh\"\n\
         ssh_known_hosts = \"{}\"\n[[target.credential]]\nuser = \"deploy\"\nssh_key_file = \"{}\"\n",
        known.display(),
        key.display()
    );
    (dir, target)
}

#[test]
fn an_ssh_target_needs_known_hosts_and_a_key_for_every_session() {
    let (dir, good) = ssh_files();
    let c = parse(&good).unwrap();
    let web = c.targets.iter().next().unwrap();
    assert_eq!(web.protocol, Protocol::Ssh);
    assert_eq!(
        web.ssh_known_hosts.as_deref(),
        Some(dir.path().join("known_hosts").as_path())
    );
    assert_eq!(
        web.credentials[0].ssh_key_file.as_deref(),
        Some(dir.path().join("key").as_path())
    );

    let no_known_hosts = good
        .lines()
        .filter(|l| !l.starts_with("ssh_known_hosts"))
        .collect::<Vec<_>>()
        .join("\n");
    let e = errors(&no_known_hosts);
    assert!(
        e.iter().any(|m| m.contains("needs ssh_known_hosts")),
        "{e:?}"
    );

    let no_credential = good
        .split("[[target.credential]]")
        .next()
        .unwrap()
        .to_owned();
    let e = errors(&no_credential);
    assert!(
        e.iter()
            .any(|m| m.contains("needs at least one [[target.credential]]")),
        "{e:?}"
    );

    let with_password = good.replace("ssh_key_file", "password_file");
    let e = errors(&with_password);
    assert!(
        e.iter().any(|m| m.contains("an ssh credential is a key")),
        "{e:?}"
    );

    let passing = good.replace(
        "protocol = \"ssh\"\n",
        "protocol = \"ssh\"\nclient_credentials = \"pass\"\n",
    );
    let e = errors(&passing);
    assert!(
        e.iter()
            .any(|m| m.contains("cannot pass the client's own credentials")),
        "{e:?}"
    );

    let as_postgres = good.replace("\"ssh\"", "\"postgres\"");
    let e = errors(&as_postgres);
    assert!(
        e.iter().any(|m| m.contains("ssh_known_hosts applies only")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|m| m.contains("ssh_key_file applies only to an ssh target")),
        "{e:?}"
    );

    let missing = good.replace("known_hosts\"", "absent\"");
    let e = errors(&missing);
    assert!(
        e.iter().any(|m| m.contains("ssh_known_hosts: cannot read")),
        "{e:?}"
    );
}

#[test]
fn an_ssh_key_others_can_read_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, good) = ssh_files();
    std::fs::set_permissions(
        dir.path().join("key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let e = errors(&good);
    assert!(e.iter().any(|m| m.contains("ssh_key_file:")), "{e:?}");
}

#[test]
fn an_ssh_credential_may_log_in_with_a_certificate_from_the_agents_user_ca() {
    let (_dir, good) = ssh_files();
    let key_line = good
        .lines()
        .find(|l| l.starts_with("ssh_key_file"))
        .unwrap()
        .to_owned();
    let certified = good.replace(&key_line, "ssh_certificate = true");
    let c = parse(&certified).unwrap();
    let credential = &c.targets.iter().next().unwrap().credentials[0];
    assert!(credential.ssh_certificate && credential.ssh_key_file.is_none());
    let both = good.replace(&key_line, &format!("{key_line}\nssh_certificate = true"));
    let e = errors(&both);
    assert!(e.iter().any(|m| m.contains("not both")), "{e:?}");
    let neither = good.replace(&key_line, "ssh_certificate = false");
    let e = errors(&neither);
    assert!(
        e.iter().any(|m| m.contains("or ssh_certificate = true")),
        "{e:?}"
    );
}

#[test]
fn upload_settings_are_read_with_defaults() {
    let c = parse("[upload]\nbucket = \"tollgate-recordings\"\n").unwrap();
    let u = c.upload.unwrap();
    assert_eq!(u.s3.bucket, "tollgate-recordings");
    assert_eq!(u.s3.region, "us-east-1");
    assert_eq!(u.prefix, "");
    assert_eq!(u.host, this_host_name());
    assert_eq!(u.max_spool_size, UploadSettings::DEFAULT_MAX_SPOOL_SIZE);
    assert_eq!(u.s3.endpoint, None);
    let c = parse(
        "[upload]\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:9000/\"\nregion = \"eu-central-1\"\nprefix = \"/fleet/eu/\"\nhost = \"runner-7\"\nmax_spool_size = \"1GiB\"\nmax_retry_interval = \"30s\"\n",
    )
    .unwrap();
    let u = c.upload.unwrap();
    assert_eq!(u.s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
    assert_eq!(u.prefix, "fleet/eu");
    assert_eq!(u.host, "runner-7");
    assert_eq!(u.max_spool_size, 1 << 30);
    assert_eq!(u.max_retry_interval, Duration::from_secs(30));
    assert!(parse("").unwrap().upload.is_none());
}

#[test]
fn bad_upload_settings_are_refused_with_what_to_change() {
    let cases = [
        ("[upload]\nbucket = \"a/b\"\n", "no slashes"),
        ("[upload]\nbucket = \"b\"\nendpoint = \"ftp://x\"\n", "upload endpoint"),
        ("[upload]\nbucket = \"b\"\nhost = \"../etc\"\n", "upload host"),
        ("[upload]\nbucket = \"b\"\nmax_spool_size = 0\n", "more than zero"),
        ("[upload]\nbucket = \"b\"\naccess_key_id = \"AKIA1\"\n", "needs secret_access_key_file"),
        (
            "[upload]\nbucket = \"b\"\nsecret_access_key_file = \"relative\"\naccess_key_id = \"A\"\n",
            "absolute path",
        ),
        (
            "[agent]\nrecording_retention_days = 3\n[upload]\nbucket = \"b\"\n",
            "cannot be combined with [upload]",
        ),
        ("[upload]\nbucket = \"b\"\nunknown = 1\n", "unknown field"),
        ("[upload]\nbucket = \"b\"\nobject_lock_mode = \"compliance\"\n", "needs object_lock_days"),
        ("[upload]\nbucket = \"b\"\nobject_lock_mode = \"strict\"\nobject_lock_days = 3\n", "not known"),
        ("[upload]\nbucket = \"b\"\nobject_lock_mode = \"governance\"\nobject_lock_days = 0\n", "between 1 and 36500"),
        ("[upload]\nregion = \"x\"\n", "bucket"),
    ];
    for (text, expected) in cases {
        let errs = errors(text);
        assert!(
            errs.iter()
                .any(|e| e.contains(expected) && e.starts_with("t.toml:")),
            "{text}: {errs:?}"
        );
    }
}

#[test]
fn a_policy_source_replaces_the_policy_paths_with_its_cached_copy() {
    let c =
        parse("[policy_source]\ns3 = \"s3://ops/tollgate/\"\nregion = \"eu-west-1\"\n").unwrap();
    let source = c.policy_source.unwrap();
    assert_eq!(
        source.origin,
        PolicyOrigin::S3 {
            s3: S3Access {
                bucket: "ops".into(),
                endpoint: None,
                region: "eu-west-1".into(),
                access_key_id: None,
                secret_access_key_file: None,
            },
            prefix: "tollgate".into(),
        }
    );
    assert_eq!(source.interval, PolicySourceSettings::DEFAULT_INTERVAL);
    assert_eq!(
        c.agent.policy_paths,
        vec![Path::new(PolicySourceSettings::DEFAULT_DIR).join("current")]
    );
    let c = parse("[policy_source]\ngit = \"https://git.example.com/ops/policies.git\"\npath = \"tollgate\"\ninterval = \"10s\"\ndir = \"/srv/p\"\n").unwrap();
    let source = c.policy_source.unwrap();
    assert_eq!(
        source.origin,
        PolicyOrigin::Git {
            url: "https://git.example.com/ops/policies.git".into(),
            branch: "main".into(),
            path: "tollgate".into(),
        }
    );
    assert_eq!(
        c.agent.policy_paths,
        vec![Path::new("/srv/p/current").to_path_buf()]
    );
}

#[test]
fn bad_policy_sources_are_refused_with_what_to_change() {
    let cases = [
        ("[policy_source]\n", "needs s3"),
        ("[policy_source]\ns3 = \"s3://a/p\"\ngit = \"https://x\"\n", "one of s3 and git"),
        ("[policy_source]\ns3 = \"https://a/p\"\n", "must be s3://BUCKET/PREFIX"),
        ("[policy_source]\ns3 = \"s3://a/p\"\nbranch = \"main\"\n", "apply to a git source"),
        ("[policy_source]\ngit = \"https://x\"\nendpoint = \"http://y\"\n", "apply to an s3 source"),
        ("[policy_source]\ngit = \"https://x\"\npath = \"../etc\"\n", "no '..'"),
        ("[policy_source]\ngit = \"--upload-pack=x\"\n", "repository URL"),
        ("[policy_source]\ngit = \"https://x\"\ndir = \"rel\"\n", "absolute path"),
        (
            "[agent]\npolicy_paths = [\"/etc/tollgate/policy.d\"]\n[policy_source]\ngit = \"https://x\"\n",
            "cannot be combined with [policy_source]",
        ),
    ];
    for (text, expected) in cases {
        let errs = errors(text);
        assert!(
            errs.iter()
                .any(|e| e.contains(expected) && e.starts_with("t.toml:")),
            "{text}: {errs:?}"
        );
    }
}

#[test]
fn shared_approvals_take_a_connection_string_without_its_password() {
    let c = parse(
        "[shared_approvals]\ndatabase = \"postgresql://tollgate@approvals.internal:5432/tollgate?sslmode=require\"\nhost = \"runner-7\"\n",
    )
    .unwrap();
    let shared = c.shared_approvals.unwrap();
    assert_eq!(shared.host, "runner-7");
    assert!(shared
        .database
        .starts_with("postgresql://tollgate@approvals.internal"));
    let c = parse("[shared_approvals]\ndatabase = \"host=db user=t dbname=t\"\n").unwrap();
    assert_eq!(c.shared_approvals.unwrap().host, this_host_name());
    let cases = [
        (
            "[shared_approvals]\ndatabase = \"postgresql://t:hunter2@db/t\"\n",
            "must not hold the password",
        ),
        (
            "[shared_approvals]\ndatabase = \"host=db password=x\"\n",
            "must not hold the password",
        ),
        (
            "[shared_approvals]\ndatabase = \"host=db sslmode=sometimes\"\n",
            "not a PostgreSQL connection string",
        ),
        (
            "[shared_approvals]\ndatabase = \"dbname=t\"\n",
            "names no host",
        ),
        (
            "[shared_approvals]\ndatabase = \"host=db\"\nhost = \"a/b\"\n",
            "letters, digits",
        ),
        (
            "[shared_approvals]\ndatabase = \"host=db\"\nca_file = \"ca.pem\"\n",
            "absolute path",
        ),
        ("[shared_approvals]\nhost = \"x\"\n", "database"),
    ];
    for (text, expected) in cases {
        let errs = errors(text);
        assert!(
            errs.iter().any(|e| e.contains(expected)),
            "{text}: {errs:?}"
        );
    }
}

#[test]
fn host_paths_are_read_from_a_file_that_no_longer_validates() {
    // A key file gone and a misspelt key: the whole check refuses it, but
    // detach and exec still find where the agent answers and pins.
    let text = r#"
[agent]
control_socket = "/run/t/control.sock"
recording_dirr = "/x"

[redirect]
pin_dir = "/sys/fs/bpf/t"
exec_socket = "/run/t/exec.sock"

[[target]]
name = "box"
protocol = "ssh"
address = "10.0.0.1:22"
ssh_known_hosts = "/nonexistent/known_hosts"

[[target.credential]]
ssh_key_file = "/nonexistent/key"
"#;
    assert!(parse(text).is_err());
    let paths = super::raw::check_host_paths(Path::new("t.toml"), text).expect("host paths");
    assert_eq!(
        paths,
        HostPaths {
            control_socket: PathBuf::from("/run/t/control.sock"),
            pin_dir: PathBuf::from("/sys/fs/bpf/t"),
            exec_socket: PathBuf::from("/run/t/exec.sock"),
        }
    );
}

#[test]
fn host_paths_default_and_are_checked_like_the_full_file() {
    let paths = super::raw::check_host_paths(Path::new("t.toml"), "").expect("defaults");
    let redirect = RedirectSettings::default();
    assert_eq!(paths.control_socket, Path::new(DEFAULT_CONTROL_SOCKET));
    assert_eq!(paths.pin_dir, redirect.pin_dir);
    assert_eq!(paths.exec_socket, redirect.exec_socket);

    let text = "[redirect]\npin_dir = \"bpf\"\nexec_socket = \"exec.sock\"\n";
    let lenient = lines(
        super::raw::check_host_paths(Path::new("t.toml"), text)
            .expect_err("relative paths are refused"),
    );
    assert_eq!(lenient, errors(text), "the same errors, in the same places");
    assert_eq!(lenient.len(), 2, "{lenient:?}");

    let broken =
        super::raw::check_host_paths(Path::new("t.toml"), "[agent\n").expect_err("not TOML");
    assert!(broken.0[0].to_string().contains("t.toml:1:"), "{broken}");
}
