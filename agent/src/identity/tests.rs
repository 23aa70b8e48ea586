//! Resolver tests on fixture trees laid out like `/proc` and `/etc`, plus one
//! live test against the real `/proc`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::symlink;
use std::path::PathBuf;

use sha2::{Digest, Sha256};

use super::socket::tests::table;
use super::*;

struct Fake {
    _dir: tempfile::TempDir,
    proc: PathBuf,
    etc: PathBuf,
    bin: PathBuf,
}

impl Fake {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let proc = dir.path().join("proc");
        let etc = dir.path().join("etc");
        let bin = dir.path().join("bin");
        for d in [&proc.join("net"), &etc, &bin] {
            fs::create_dir_all(d).unwrap();
        }
        fs::write(
            etc.join("passwd"),
            "# local users\nroot:x:0:0:root:/root:/bin/bash\n\ngarbage line\nci:x:1001:1001:CI:/home/ci:/bin/sh\n",
        )
        .unwrap();
        fs::write(etc.join("group"), "root:x:0:\nrunners:x:1001:ci\n").unwrap();
        let fake = Fake {
            _dir: dir,
            proc,
            etc,
            bin,
        };
        fake.tcp(&[]);
        fake.tcp6(&[]);
        fake
    }

    fn resolver(&self) -> IdentityResolver {
        IdentityResolver::with_roots(&self.proc, &self.etc)
    }

    fn tcp(&self, rows: &[(SocketAddr, SocketAddr, u32, u64)]) {
        fs::write(self.proc.join("net/tcp"), table(rows)).unwrap();
    }

    fn tcp6(&self, rows: &[(SocketAddr, SocketAddr, u32, u64)]) {
        fs::write(self.proc.join("net/tcp6"), table(rows)).unwrap();
    }

    /// A process with stat, status, cmdline (`comm`), cgroup and a plain
    /// environment; no exe link.
    fn process(&self, pid: u32, ppid: u32, comm: &str, uid: u32) -> PathBuf {
        let d = self.proc.join(pid.to_string());
        fs::create_dir_all(d.join("fd")).unwrap();
        fs::write(
            d.join("stat"),
            format!("{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560 120 0 0 0 3 1 0 0 20 0 1 0 4711 1000000 300 18446744073709551615\n"),
        )
        .unwrap();
        fs::write(
            d.join("status"),
            format!("Name:\t{comm}\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t{pid}\nPid:\t{pid}\nPPid:\t{ppid}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t{uid}\t{uid}\t{uid}\t{uid}\n"),
        )
        .unwrap();
        fs::write(d.join("cmdline"), format!("{comm}\0")).unwrap();
        fs::write(
            d.join("cgroup"),
            "12:pids:/ci\n1:name=systemd:/system.slice/ci.service\n0::/ci/job-7\n",
        )
        .unwrap();
        fs::write(d.join("environ"), "PATH=/usr/bin\0HOME=/home/ci\0").unwrap();
        d
    }

    /// Links `<pid>/exe` to a real file `bin/<name>` holding `content`.
    fn exe(&self, pid: u32, name: &str, content: &[u8]) -> PathBuf {
        let path = self.bin.join(name);
        fs::write(&path, content).unwrap();
        symlink(&path, self.proc.join(pid.to_string()).join("exe")).unwrap();
        path
    }

    fn environ(&self, pid: u32, pairs: &[(&str, &str)]) {
        let mut bytes = Vec::new();
        for (k, v) in pairs {
            bytes.extend_from_slice(format!("{k}={v}\0").as_bytes());
        }
        fs::write(self.proc.join(pid.to_string()).join("environ"), bytes).unwrap();
    }

    fn cmdline(&self, pid: u32, args: &[&str]) {
        let mut bytes = Vec::new();
        for a in args {
            bytes.extend_from_slice(a.as_bytes());
            bytes.push(0);
        }
        fs::write(self.proc.join(pid.to_string()).join("cmdline"), bytes).unwrap();
    }

    fn fd(&self, pid: u32, fd: u32, target: &str) {
        symlink(
            target,
            self.proc
                .join(pid.to_string())
                .join("fd")
                .join(fd.to_string()),
        )
        .unwrap();
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn has_gap(id: &ProcessIdentity, needle: &str) -> bool {
    id.gaps.iter().any(|g| g.contains(needle))
}

const GITHUB_ENV: &[(&str, &str)] = &[
    ("GITHUB_ACTIONS", "true"),
    ("GITHUB_REPOSITORY", "org/repo"),
    ("GITHUB_REF_NAME", "main"),
    ("GITHUB_JOB", "migrate"),
    ("GITHUB_RUN_ID", "987"),
    ("GITHUB_WORKFLOW", "deploy"),
    ("GITHUB_ACTOR", "octocat"),
    ("GITHUB_SERVER_URL", "https://github.com"),
];

/// psql (4242) <- bash (4200, the step shell) <- Runner.Worker (4100) <- Runner.Listener (4000) <- 1
fn github_job(fake: &Fake) {
    fake.process(4000, 1, "Runner.Listener", 1001);
    fake.process(4100, 4000, "Runner.Worker", 1001);
    fake.exe(4100, "Runner.Worker", b"runner worker");
    fake.process(4200, 4100, "bash", 1001);
    fake.environ(4200, GITHUB_ENV);
    fake.process(4242, 4200, "psql", 1001);
    fake.cmdline(4242, &["psql", "-h", "127.0.0.1", "-p", "6432", "app"]);
    // The job tries to pass itself off as another repository.
    fake.environ(
        4242,
        &[
            ("GITHUB_ACTIONS", "true"),
            ("GITHUB_REPOSITORY", "evil/forged"),
        ],
    );
    fake.fd(4242, 0, "/dev/null");
    fake.fd(4242, 3, "socket:[12345]");
}

#[test]
fn identifies_a_github_actions_job_end_to_end() {
    let fake = Fake::new();
    github_job(&fake);
    let psql = fake.exe(4242, "psql", b"the psql binary");
    // Another process of the same user with another socket.
    fake.process(4300, 1, "sleep", 1001);
    fake.fd(4300, 3, "socket:[999]");
    let client = addr("127.0.0.1:40000");
    let server = addr("127.0.0.1:6432");
    fake.tcp(&[
        (server, client, 0, 888), // the proxy's accepted end
        (client, server, 1001, 12345),
    ]);

    let r = fake.resolver();
    assert_eq!(
        r.find_socket_owner(client, server).unwrap(),
        SocketOwner {
            inode: 12345,
            uid: 1001,
            pid: Some(4242)
        }
    );
    let id = r.identify_peer(client, server);
    assert_eq!(id.pid, Some(4242));
    assert_eq!((id.uid, id.gid), (Some(1001), Some(1001)));
    assert_eq!(
        (id.user.as_deref(), id.group.as_deref()),
        (Some("ci"), Some("runners"))
    );
    assert_eq!(id.comm.as_deref(), Some("psql"));
    assert_eq!(id.exe.as_deref(), Some(psql.to_str().unwrap()));
    assert_eq!(
        id.exe_sha256.as_deref(),
        Some(hex::encode(Sha256::digest(b"the psql binary")).as_str())
    );
    assert_eq!(id.cmdline, ["psql", "-h", "127.0.0.1", "-p", "6432", "app"]);
    assert_eq!(id.cgroup.as_deref(), Some("/ci/job-7"));
    assert_eq!(
        id.ancestry,
        vec![
            Ancestor {
                pid: 4200,
                comm: "bash".into(),
                exe: None
            },
            Ancestor {
                pid: 4100,
                comm: "Runner.Worker".into(),
                exe: Some(
                    fake.bin
                        .join("Runner.Worker")
                        .to_string_lossy()
                        .into_owned()
                )
            },
        ]
    );
    assert_eq!(
        id.ci,
        Some(CiContext {
            provider: CiProvider::GithubActions,
            repository: Some("org/repo".into()),
            branch: Some("main".into()),
            job: Some("migrate".into()),
            run_id: Some("987".into()),
            workflow: Some("deploy".into()),
            actor: Some("octocat".into()),
            url: Some("https://github.com/org/repo/actions/runs/987".into()),
            commit: None,
            runner_pid: Some(4100),
            verified: true,
        })
    );
    assert!(id.gaps.is_empty(), "{:?}", id.gaps);
    assert_eq!(
        id.summary(),
        format!(
            "pid=4242 exe={} uid=1001(ci) ci=github_actions:org/repo",
            psql.display()
        )
    );

    // Serialized names are the documented ones, and the identity round-trips.
    let json = serde_json::to_value(&id).unwrap();
    assert_eq!(json["ci"]["provider"], "github_actions");
    let back: ProcessIdentity = serde_json::from_value(json).unwrap();
    assert_eq!(back, id);
}

#[test]
fn gitlab_runner_parent_uses_own_environment_as_verified() {
    let fake = Fake::new();
    fake.process(5000, 1, "gitlab-runner", 0);
    fake.process(5001, 5000, "sh", 1001);
    fake.environ(
        5001,
        &[
            ("GITLAB_CI", "true"),
            ("CI_PROJECT_PATH", "group/project"),
            ("CI_COMMIT_REF_NAME", "feature"),
            ("CI_JOB_NAME", "test"),
            ("CI_PIPELINE_ID", "55"),
            ("GITLAB_USER_LOGIN", "alice"),
            (
                "CI_JOB_URL",
                "https://gitlab.example/group/project/-/jobs/9",
            ),
        ],
    );
    let id = fake.resolver().describe_process(5001);
    assert_eq!(id.ancestry.len(), 1);
    let ci = id.ci.clone().unwrap();
    assert_eq!(ci.provider, CiProvider::GitlabCi);
    assert_eq!(ci.repository.as_deref(), Some("group/project"));
    assert_eq!(ci.branch.as_deref(), Some("feature"));
    assert_eq!(ci.job.as_deref(), Some("test"));
    assert_eq!(ci.run_id.as_deref(), Some("55"));
    assert_eq!(ci.actor.as_deref(), Some("alice"));
    assert_eq!(ci.workflow, None);
    assert_eq!(ci.runner_pid, Some(5000));
    assert!(ci.verified);
    // No exe link in the fixture: recorded as a gap, not an error.
    assert!(
        has_gap(
            &id,
            "cannot read the executable (path and hash) of process 5001: not found"
        ),
        "{:?}",
        id.gaps
    );
    assert_eq!(
        id.summary(),
        "pid=5001 comm=sh uid=1001(ci) ci=gitlab_ci:group/project"
    );
}

#[test]
fn buildkite_agent_detected_by_exe_basename() {
    let fake = Fake::new();
    fake.process(6000, 1, "agent", 1001);
    fake.exe(6000, "buildkite-agent", b"bk");
    fake.process(6001, 6000, "bash", 1001);
    fake.environ(
        6001,
        &[
            ("BUILDKITE", "true"),
            ("BUILDKITE_PIPELINE_SLUG", "deploy"),
            ("BUILDKITE_BRANCH", "main"),
            ("BUILDKITE_LABEL", "migrate db"),
            ("BUILDKITE_BUILD_NUMBER", "12"),
            ("BUILDKITE_BUILD_CREATOR", "Bob"),
            (
                "BUILDKITE_BUILD_URL",
                "https://buildkite.com/org/deploy/builds/12",
            ),
        ],
    );
    fake.process(6002, 6001, "psql", 1001);
    let id = fake.resolver().describe_process(6002);
    let ci = id.ci.unwrap();
    assert_eq!(
        (
            ci.provider,
            ci.repository.as_deref(),
            ci.branch.as_deref(),
            ci.job.as_deref()
        ),
        (
            CiProvider::Buildkite,
            Some("deploy"),
            Some("main"),
            Some("migrate db")
        )
    );
    assert_eq!(ci.run_id.as_deref(), Some("12"));
    assert_eq!(ci.actor.as_deref(), Some("Bob"));
    assert_eq!(
        ci.url.as_deref(),
        Some("https://buildkite.com/org/deploy/builds/12")
    );
    assert_eq!((ci.runner_pid, ci.verified), (Some(6000), true));
}

#[test]
fn jenkins_agent_is_a_java_process_running_remoting_jar() {
    let fake = Fake::new();
    fake.process(7000, 1, "java", 1001);
    fake.cmdline(
        7000,
        &[
            "java",
            "-jar",
            "/var/lib/jenkins/remoting.jar",
            "-url",
            "https://ci/",
        ],
    );
    fake.process(7001, 7000, "sh", 1001);
    fake.environ(
        7001,
        &[
            ("JENKINS_URL", "https://ci/"),
            ("JOB_NAME", "team/deploy"),
            ("GIT_BRANCH", "origin/main"),
            ("BUILD_NUMBER", "301"),
            ("BUILD_URL", "https://ci/job/team/job/deploy/301/"),
        ],
    );
    fake.process(7002, 7001, "mysql", 1001);
    // An unrelated java process in the chain is not a runner.
    fake.process(7100, 1, "java", 1001);
    fake.cmdline(7100, &["java", "-jar", "app.jar"]);
    fake.process(7101, 7100, "sh", 1001);

    let r = fake.resolver();
    let ci = r.describe_process(7002).ci.unwrap();
    assert_eq!(ci.provider, CiProvider::Jenkins);
    assert_eq!(ci.repository.as_deref(), Some("team/deploy"));
    assert_eq!(ci.job.as_deref(), Some("team/deploy"));
    assert_eq!(ci.branch.as_deref(), Some("origin/main"));
    assert_eq!(ci.run_id.as_deref(), Some("301"));
    assert_eq!(
        ci.url.as_deref(),
        Some("https://ci/job/team/job/deploy/301/")
    );
    assert_eq!((ci.runner_pid, ci.verified), (Some(7000), true));

    let other = r.describe_process(7101);
    assert_eq!(other.ci, None);
    assert_eq!(other.ancestry.len(), 1);
    assert!(
        other.gaps.iter().all(|g| !g.contains("ci context")),
        "{:?}",
        other.gaps
    );
}

#[test]
fn ci_context_claimed_only_by_own_environment_is_unverified() {
    let fake = Fake::new();
    fake.process(8000, 1, "bash", 1001);
    fake.process(8001, 8000, "psql", 1001);
    fake.environ(8001, GITHUB_ENV);
    let id = fake.resolver().describe_process(8001);
    let ci = id.ci.clone().unwrap();
    assert_eq!(ci.provider, CiProvider::GithubActions);
    assert_eq!(ci.repository.as_deref(), Some("org/repo"));
    assert_eq!((ci.runner_pid, ci.verified), (None, false));
    assert!(has_gap(
        &id,
        "ci context claimed by the process environment only; no runner ancestor found"
    ));
    assert!(
        id.summary()
            .ends_with(" ci=github_actions:org/repo(unverified)"),
        "{}",
        id.summary()
    );
}

#[test]
fn runner_child_environment_unreadable_leaves_an_unverified_context() {
    let fake = Fake::new();
    github_job(&fake);
    fs::remove_file(fake.proc.join("4200/environ")).unwrap();
    let id = fake.resolver().describe_process(4242);
    let ci = id.ci.clone().unwrap();
    assert_eq!(ci.provider, CiProvider::GithubActions);
    assert_eq!(ci.repository, None, "the forged value must not be used");
    assert_eq!((ci.runner_pid, ci.verified), (Some(4100), false));
    assert!(has_gap(&id, "cannot read the environment of pid 4200, started by the github_actions runner (pid 4100)"), "{:?}", id.gaps);
}

#[test]
fn comm_with_spaces_and_parens_and_deleted_exe() {
    let fake = Fake::new();
    fake.process(9000, 1, "my (odd) tool)", 0);
    fake.exe(9000, "tool (deleted)", b"old image");
    let id = fake.resolver().describe_process(9000);
    assert_eq!(id.comm.as_deref(), Some("my (odd) tool)"));
    assert_eq!(
        (id.user.as_deref(), id.group.as_deref()),
        (Some("root"), Some("root"))
    );
    assert!(id.ancestry.is_empty());
    assert!(id.exe.as_deref().unwrap().ends_with("tool (deleted)"));
    assert_eq!(
        id.exe_sha256.as_deref(),
        Some(hex::encode(Sha256::digest(b"old image")).as_str())
    );
    assert!(has_gap(&id, "was deleted or replaced"), "{:?}", id.gaps);
}

#[test]
fn exited_and_unknown_processes_are_gaps() {
    let fake = Fake::new();
    let r = fake.resolver();
    let id = r.describe_process(4242);
    assert_eq!(id.pid, Some(4242));
    assert_eq!(
        id.gaps,
        ["process 4242 exited before its identity was read"]
    );

    // The socket is there but no process holds it (exited, other namespace).
    let client = addr("127.0.0.1:40000");
    let server = addr("127.0.0.1:6432");
    fake.tcp(&[(client, server, 1001, 12345)]);
    assert_eq!(
        r.find_socket_owner(client, server).unwrap(),
        SocketOwner {
            inode: 12345,
            uid: 1001,
            pid: None
        }
    );
    let id = r.identify_peer(client, server);
    assert_eq!(
        (id.pid, id.uid, id.user.as_deref()),
        (None, Some(1001), Some("ci"))
    );
    assert!(
        has_gap(&id, "no process holds socket inode 12345"),
        "{:?}",
        id.gaps
    );
    assert!(has_gap(&id, "only the socket owner uid is known"));
    assert_eq!(id.summary(), "pid=? exe=? uid=1001(ci)");

    // The socket row itself is gone.
    let id = r.identify_peer(addr("127.0.0.1:40001"), server);
    assert_eq!(id.pid, None);
    assert_eq!(id.uid, None);
    assert_eq!(id.gaps.len(), 1);
    assert!(
        has_gap(&id, "no tcp socket 127.0.0.1:40001 -> 127.0.0.1:6432 in "),
        "{:?}",
        id.gaps
    );

    // A process dir whose files vanish halfway: unknown uid falls back to the socket's.
    fake.process(4242, 1, "psql", 1001);
    fake.fd(4242, 3, "socket:[12345]");
    fs::remove_file(fake.proc.join("4242/status")).unwrap();
    let id = r.identify_peer(client, server);
    assert_eq!(
        (id.pid, id.uid, id.user.as_deref()),
        (Some(4242), Some(1001), Some("ci"))
    );
    assert!(
        has_gap(
            &id,
            "cannot read the status (uid, gid) of process 4242: not found"
        ),
        "{:?}",
        id.gaps
    );
    assert!(has_gap(
        &id,
        "only the socket owner uid (1001) is known for process 4242"
    ));
}

#[test]
fn ipv6_and_v4_mapped_connections() {
    let fake = Fake::new();
    fake.process(4242, 1, "psql", 1001);
    fake.fd(4242, 5, "socket:[777]");
    fake.fd(4242, 6, "socket:[778]");
    let c6 = addr("[::1]:40000");
    let s6 = addr("[::1]:6432");
    let c4 = addr("127.0.0.1:40001");
    let s4 = addr("127.0.0.1:6432");
    let mapped = |a: SocketAddr| match a {
        SocketAddr::V4(v) => SocketAddr::new(IpAddr::V6(v.ip().to_ipv6_mapped()), v.port()),
        other => other,
    };
    fake.tcp6(&[(c6, s6, 1001, 777), (mapped(c4), mapped(s4), 1001, 778)]);
    let r = fake.resolver();
    assert_eq!(r.find_socket_owner(c6, s6).unwrap().inode, 777);
    assert_eq!(r.find_socket_owner(c4, s4).unwrap().inode, 778);
    assert_eq!(r.identify_peer(mapped(c4), mapped(s4)).pid, Some(4242));
}

#[test]
fn ancestry_loop_and_depth_are_guarded() {
    let fake = Fake::new();
    // 100 <- 101 <- 102 <- 101 ...
    fake.process(100, 101, "a", 0);
    fake.process(101, 102, "b", 0);
    fake.process(102, 101, "c", 0);
    let id = fake.resolver().describe_process(100);
    assert_eq!(
        id.ancestry.iter().map(|a| a.pid).collect::<Vec<_>>(),
        [101, 102]
    );
    assert!(has_gap(&id, "loops back to pid 101"), "{:?}", id.gaps);

    // A process that is its own parent.
    fake.process(200, 200, "self", 0);
    let id = fake.resolver().describe_process(200);
    assert!(id.ancestry.is_empty());
    assert!(has_gap(&id, "loops back to pid 200"));

    // A chain deeper than the limit.
    for pid in 1000..1100 {
        fake.process(pid, pid + 1, "deep", 0);
    }
    let id = fake.resolver().describe_process(1000);
    assert_eq!(id.ancestry.len(), MAX_ANCESTRY);
    assert!(has_gap(&id, "cut at 64 levels"), "{:?}", id.gaps);

    // A parent that vanished.
    fake.process(300, 301, "orphan", 0);
    let id = fake.resolver().describe_process(300);
    assert!(id.ancestry.is_empty());
    assert!(has_gap(&id, "ancestry of process 300 stops at pid 301"));
}

#[test]
fn exe_hash_cache_is_keyed_by_file_identity() {
    let fake = Fake::new();
    for pid in [10, 11] {
        fake.process(pid, 1, "psql", 0);
    }
    let bin = fake.exe(10, "psql", b"same binary");
    symlink(&bin, fake.proc.join("11/exe")).unwrap();
    fake.process(12, 1, "mysql", 0);
    fake.exe(12, "mysql", b"another binary");

    let r = fake.resolver();
    let a = r.describe_process(10).exe_sha256.unwrap();
    let b = r.describe_process(11).exe_sha256.unwrap();
    assert_eq!(a, b);
    assert_eq!((r.cache_len(), r.exe_hashes.computed()), (1, 1));
    let c = r.describe_process(12).exe_sha256.unwrap();
    assert_ne!(a, c);
    assert_eq!((r.cache_len(), r.exe_hashes.computed()), (2, 2));
    r.describe_process(10);
    assert_eq!(r.exe_hashes.computed(), 2);
}

#[test]
fn missing_user_and_group_entries_are_gaps() {
    let fake = Fake::new();
    fake.process(20, 1, "tool", 4321);
    let id = fake.resolver().describe_process(20);
    assert_eq!((id.uid, id.user.as_deref()), (Some(4321), None));
    assert!(has_gap(&id, "uid 4321 has no entry in"), "{:?}", id.gaps);
    assert!(has_gap(&id, "gid 4321 has no entry in"));
    assert_eq!(id.summary(), "pid=20 comm=tool uid=4321");
}

/// Reads the real uid of this process from `/proc/self/status`.
fn own_uid() -> u32 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    process::parse_status_ids(&status).0.unwrap()
}

#[test]
fn live_loopback_connection_is_this_process() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server = listener.local_addr().unwrap();
    let _client = std::net::TcpStream::connect(server).unwrap();
    let (accepted, peer) = listener.accept().unwrap();
    assert_eq!(accepted.local_addr().unwrap(), server);

    let r = IdentityResolver::new();
    let id = r.identify_peer(peer, server);
    assert_eq!(id.pid, Some(std::process::id()), "{id:?}");
    assert_eq!(id.uid, Some(own_uid()));
    let exe = std::env::current_exe().unwrap();
    assert_eq!(id.exe.as_deref(), Some(exe.to_str().unwrap()));
    let digest = id.exe_sha256.as_deref().unwrap();
    assert_eq!(digest.len(), 64);
    assert!(digest.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(!id.cmdline.is_empty());
    assert!(!has_gap(&id, "no longer holds"), "{:?}", id.gaps);
}
