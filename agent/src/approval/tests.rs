//! The request registry (N of M, segregation of duties, expiry, edits,
//! grants), request ids, reviewer names and the grant store.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot::error::TryRecvError;

use super::reviewers::{groups_of, user_name};
use super::*;
use crate::identity::{CiContext, CiProvider, ProcessIdentity};
use crate::policy::{Approver, GrantScope, ReviewSettings};

fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_780_000_000)
}

fn settings(approvals: u32, grant: GrantScope) -> Arc<ReviewSettings> {
    Arc::new(ReviewSettings {
        approvers: vec![
            Approver::UnixGroup("dba".into()),
            Approver::Reviewers("oncall".into()),
        ],
        approvals,
        timeout: Duration::from_secs(600),
        grant,
        grant_hours: None,
    })
}

fn requester() -> ProcessIdentity {
    ProcessIdentity {
        uid: Some(1001),
        exe: Some("/usr/bin/psql".into()),
        cgroup: Some("/ci/job-7".into()),
        ci: Some(CiContext {
            provider: CiProvider::GithubActions,
            repository: Some("acme/shop".into()),
            branch: Some("main".into()),
            job: Some("migrate".into()),
            run_id: Some("42".into()),
            workflow: Some("deploy".into()),
            actor: Some("octo-bot".into()),
            url: None,
            commit: None,
            runner_pid: Some(10),
            verified: true,
        }),
        ..ProcessIdentity::default()
    }
}

fn context(review: Arc<ReviewSettings>) -> RequestContext {
    RequestContext {
        target: "prod".into(),
        database_user: Some("app".into()),
        statement: "DELETE FROM orders WHERE id = 1".into(),
        run_text: "DELETE FROM orders WHERE id = 1".into(),
        hidden_literals: Some(0),
        session_so_far: Vec::new(),
        fingerprint: Some("abc123".into()),
        rule: "review-deletes".into(),
        rule_message: Some("deletes need a second pair of eyes".into()),
        review,
        identity: requester(),
        session: Some("s1".into()),
    }
}

#[test]
fn reviewers_see_the_shown_text_and_an_approval_runs_the_text_as_sent() {
    let registry = registry();
    let mut held = context(settings(1, GrantScope::Statement));
    held.run_text = "DELETE FROM customers WHERE email = 'ada@example.com'".into();
    held.statement = "DELETE FROM customers WHERE email = '***'".into();
    held.hidden_literals = Some(1);
    held.session_so_far = vec![PriorStatement {
        at: 1,
        action: "allow".into(),
        refused: false,
        statement: "SELECT count(*) FROM customers WHERE email = '***'".into(),
    }];
    let (id, mut outcome) = registry.submit(held, t0()).unwrap();
    let shown = serde_json::to_string(&registry.show(&id).unwrap()).unwrap();
    assert!(!shown.contains("ada@example.com"), "{shown}");
    assert!(shown.contains("email = '***'") && shown.contains("\"hidden_literals\":1"));
    assert!(shown.contains("SELECT count(*) FROM customers"), "{shown}");
    let alice = reviewer(2001, "alice", &["dba"]);
    let effect = registry
        .approve(&id, &alice, ApprovalAsk::default(), t0())
        .unwrap();
    let ApprovalEffect::Approved { outcome: ended, .. } = effect else {
        panic!("{effect:?}");
    };
    assert!(!serde_json::to_string(&ended).unwrap().contains("ada@"));
    match outcome.try_recv() {
        Ok(Outcome::Approved { text, edited, .. }) => {
            assert_eq!(
                text,
                "DELETE FROM customers WHERE email = 'ada@example.com'"
            );
            assert!(!edited);
        }
        other => panic!("{other:?}"),
    }
}

fn reviewer(uid: u32, user: &str, groups: &[&str]) -> Reviewer {
    Reviewer {
        uid,
        user: user.into(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        cgroup: Some(format!("/user.slice/user-{uid}.slice/session-1.scope")),
        ci_actor: None,
        via: format!("unix:{uid}"),
    }
}

fn registry() -> Registry {
    let mut groups = BTreeMap::new();
    groups.insert("oncall".to_owned(), vec!["carol".to_owned()]);
    Registry::new(groups)
}

fn approve(reason: &str) -> ApprovalAsk {
    ApprovalAsk {
        reason: Some(reason.into()),
        ..ApprovalAsk::default()
    }
}

#[test]
fn one_approval_releases_the_held_statement() {
    let r = registry();
    let (id, mut outcome) = r
        .submit(context(settings(1, GrantScope::Statement)), t0())
        .unwrap();
    assert_eq!(r.list().len(), 1);
    assert_eq!(r.list()[0].id, id);
    assert_eq!(outcome.try_recv(), Err(TryRecvError::Empty));
    let alice = reviewer(2001, "alice", &["staff", "dba"]);
    let effect = r.approve(&id, &alice, approve("looks fine"), t0()).unwrap();
    let want = Outcome::Approved {
        text: "DELETE FROM orders WHERE id = 1".into(),
        edited: false,
        by: vec!["alice".into()],
    };
    assert_eq!(
        effect,
        ApprovalEffect::Approved {
            outcome: want.clone(),
            grant: None
        }
    );
    assert_eq!(outcome.try_recv(), Ok(want.clone()));
    assert!(r.list().is_empty());
    // Still shown, with its outcome; a late approval changes nothing.
    assert_eq!(r.show(&id).and_then(|v| v.outcome), Some(want));
    let bob = reviewer(2002, "bob", &["dba"]);
    let late = r.approve(&id, &bob, approve("me too"), t0());
    assert_eq!(late, Err(ApprovalError::Ended("approved".into())));
    assert_eq!(late.unwrap_err().http_status(), 409);
}

#[test]
fn n_of_m_counts_each_person_once() {
    let r = registry();
    let (id, mut outcome) = r
        .submit(context(settings(2, GrantScope::Statement)), t0())
        .unwrap();
    let alice = reviewer(2001, "alice", &["dba"]);
    let need_two = ApprovalEffect::Counted { have: 1, need: 2 };
    assert_eq!(
        r.approve(&id, &alice, approve("ok"), t0()),
        Ok(need_two.clone())
    );
    // The same person again, even through another session, counts once.
    let mut alice_elsewhere = alice.clone();
    alice_elsewhere.cgroup = Some("/user.slice/other.scope".into());
    assert_eq!(
        r.approve(&id, &alice_elsewhere, approve("really"), t0()),
        Ok(need_two)
    );
    assert_eq!(outcome.try_recv(), Err(TryRecvError::Empty));
    // A member of the named reviewer group completes it.
    let carol = reviewer(2003, "carol", &["staff"]);
    match r.approve(&id, &carol, approve("ok"), t0()) {
        Ok(ApprovalEffect::Approved {
            outcome: Outcome::Approved { by, .. },
            ..
        }) => assert_eq!(by, ["alice", "carol"]),
        other => panic!("not approved: {other:?}"),
    }
    assert!(matches!(outcome.try_recv(), Ok(Outcome::Approved { .. })));
}

#[test]
fn only_approvers_decide() {
    let r = registry();
    let (id, _outcome) = r
        .submit(context(settings(1, GrantScope::Statement)), t0())
        .unwrap();
    let mallory = reviewer(2009, "mallory", &["staff"]);
    let refused = r
        .approve(&id, &mallory, approve("trust me"), t0())
        .unwrap_err();
    assert!(
        matches!(refused, ApprovalError::NotAnApprover(_)),
        "{refused:?}"
    );
    assert_eq!(refused.http_status(), 403);
    assert!(
        refused.to_string().contains("group:dba, reviewers:oncall"),
        "{refused}"
    );
    let refused = r.deny(&id, &mallory, "no".into(), t0()).unwrap_err();
    assert!(matches!(refused, ApprovalError::NotAnApprover(_)));
    assert_eq!(r.list().len(), 1);
    assert!(r.list()[0].approvals.is_empty());
}

#[test]
fn the_requester_never_decides_its_own_request() {
    let r = registry();
    let (id, _outcome) = r
        .submit(context(settings(1, GrantScope::Statement)), t0())
        .unwrap();
    // Same uid, even in the approver group.
    let same_uid = reviewer(1001, "deploy", &["dba"]);
    // Same verified CI actor, from another uid and cgroup.
    let mut same_actor = reviewer(2001, "alice", &["dba"]);
    same_actor.ci_actor = Some("octo-bot".into());
    // A process inside the requesting job's cgroup.
    let mut inside = reviewer(2002, "bob", &["dba"]);
    inside.cgroup = Some("/ci/job-7/step-3".into());
    let mut same_cgroup = reviewer(2004, "dave", &["dba"]);
    same_cgroup.cgroup = Some("/ci/job-7".into());
    for who in [&same_uid, &same_actor, &inside, &same_cgroup] {
        let e = r.approve(&id, who, approve("self"), t0()).unwrap_err();
        assert!(
            matches!(e, ApprovalError::SelfApproval(_)),
            "{}: {e:?}",
            who.user
        );
        assert_eq!(e.http_status(), 403);
        let e = r.deny(&id, who, "self".into(), t0()).unwrap_err();
        assert!(
            matches!(e, ApprovalError::SelfApproval(_)),
            "{}: {e:?}",
            who.user
        );
    }
    assert!(r.list()[0].approvals.is_empty());
    // A sibling cgroup whose name only starts the same is another job.
    let mut sibling = reviewer(2005, "erin", &["dba"]);
    sibling.cgroup = Some("/ci/job-70".into());
    assert!(matches!(
        r.approve(&id, &sibling, approve("ok"), t0()),
        Ok(ApprovalEffect::Approved { .. })
    ));
}

#[test]
fn an_unverified_ci_actor_does_not_block_a_reviewer() {
    let r = registry();
    let mut ctx = context(settings(1, GrantScope::Statement));
    if let Some(ci) = ctx.identity.ci.as_mut() {
        ci.verified = false;
    }
    let (id, _outcome) = r.submit(ctx, t0()).unwrap();
    let mut alice = reviewer(2001, "alice", &["dba"]);
    alice.ci_actor = Some("octo-bot".into());
    assert!(r.approve(&id, &alice, approve("ok"), t0()).is_ok());
}

#[test]
fn denial_ends_the_request_with_the_reviewer_and_reason() {
    let r = registry();
    let (id, mut outcome) = r
        .submit(context(settings(2, GrantScope::Statement)), t0())
        .unwrap();
    let alice = reviewer(2001, "alice", &["dba"]);
    let empty = r.deny(&id, &alice, "  ".into(), t0()).unwrap_err();
    assert_eq!(empty.http_status(), 400);
    let bob = reviewer(2002, "bob", &["dba"]);
    r.approve(&id, &bob, approve("ok"), t0()).unwrap();
    let denied = r
        .deny(&id, &alice, "not during the sale".into(), t0())
        .unwrap();
    let want = Outcome::Denied {
        by: "alice".into(),
        reason: "not during the sale".into(),
        via: "unix:2001".into(),
    };
    assert_eq!(denied, want);
    assert_eq!(outcome.try_recv(), Ok(want));
    assert_eq!(
        r.approve(&id, &bob, approve("ok"), t0()),
        Err(ApprovalError::Ended("denied".into()))
    );
}

#[test]
fn requests_expire_at_their_timeout() {
    let r = registry();
    let (id, mut outcome) = r
        .submit(context(settings(1, GrantScope::Statement)), t0())
        .unwrap();
    assert_eq!(r.next_deadline(), Some(t0() + Duration::from_secs(600)));
    assert!(r.expire_due(t0() + Duration::from_secs(599)).is_empty());
    assert_eq!(outcome.try_recv(), Err(TryRecvError::Empty));
    // An approval after the deadline is too late, even before a sweep.
    let alice = reviewer(2001, "alice", &["dba"]);
    let late = r.approve(&id, &alice, approve("ok"), t0() + Duration::from_secs(600));
    assert_eq!(late, Err(ApprovalError::Ended("expired".into())));
    assert_eq!(outcome.try_recv(), Ok(Outcome::Expired));
    assert!(r.list().is_empty());
    assert_eq!(r.next_deadline(), None);

    let (id2, mut outcome2) = r
        .submit(context(settings(1, GrantScope::Statement)), t0())
        .unwrap();
    assert_eq!(r.expire_due(t0() + Duration::from_secs(601)), vec![id2]);
    assert_eq!(outcome2.try_recv(), Ok(Outcome::Expired));
}

#[test]
fn cancel_and_abort_end_pending_requests() {
    let r = registry();
    let (a, mut outcome_a) = r
        .submit(context(settings(1, GrantScope::Statement)), t0())
        .unwrap();
    let (_b, mut outcome_b) = r
        .submit(context(settings(1, GrantScope::Statement)), t0())
        .unwrap();
    let (_c, mut outcome_c) = r
        .submit(context(settings(1, GrantScope::Statement)), t0())
        .unwrap();
    assert!(r.cancel(&a));
    assert!(!r.cancel(&a));
    assert_eq!(outcome_a.try_recv(), Ok(Outcome::Cancelled));
    assert_eq!(r.abort_all(), 2);
    assert_eq!(outcome_b.try_recv(), Ok(Outcome::Aborted));
    assert_eq!(outcome_c.try_recv(), Ok(Outcome::Aborted));
    assert!(r.list().is_empty());
    let alice = reviewer(2001, "alice", &["dba"]);
    assert_eq!(
        r.approve(&a, &alice, approve("ok"), t0()),
        Err(ApprovalError::Ended(
            "cancelled (the client went away)".into()
        ))
    );
}

#[test]
fn an_edit_replaces_the_text_and_restarts_the_count() {
    let r = registry();
    let mut ctx = context(settings(2, GrantScope::Statement));
    ctx.statement = "DELETE FROM orders".into();
    let (id, mut outcome) = r.submit(ctx, t0()).unwrap();
    let alice = reviewer(2001, "alice", &["dba"]);
    let bob = reviewer(2002, "bob", &["dba"]);
    r.approve(&id, &alice, approve("ok"), t0()).unwrap();
    let edit = ApprovalAsk {
        reason: Some("only the test order".into()),
        edit: Some("DELETE FROM orders WHERE id = 7".into()),
        grant: None,
    };
    // Alice approved another text: her approval no longer counts.
    assert_eq!(
        r.approve(&id, &bob, edit, t0()),
        Ok(ApprovalEffect::Counted { have: 1, need: 2 })
    );
    let view = r.show(&id).unwrap();
    assert_eq!(view.text, "DELETE FROM orders WHERE id = 7");
    assert_eq!(view.edited_by.as_deref(), Some("bob"));
    assert_eq!(view.context.statement, "DELETE FROM orders");
    r.approve(&id, &alice, approve("the edit is fine"), t0())
        .unwrap();
    assert_eq!(
        outcome.try_recv(),
        Ok(Outcome::Approved {
            text: "DELETE FROM orders WHERE id = 7".into(),
            edited: true,
            by: vec!["bob".into(), "alice".into()],
        })
    );
}

#[test]
fn grants_are_given_only_as_the_rule_allows() {
    let r = registry();
    let alice = reviewer(2001, "alice", &["dba"]);
    let bob = reviewer(2002, "bob", &["dba"]);
    let ask = |grant: u64| ApprovalAsk {
        grant: Some(Duration::from_secs(grant)),
        ..ApprovalAsk::default()
    };
    let (id, _o) = r
        .submit(context(settings(1, GrantScope::Statement)), t0())
        .unwrap();
    let e = r.approve(&id, &alice, ask(60), t0()).unwrap_err();
    assert!(e.to_string().contains("allows no grant"), "{e}");

    let up_to_hour = GrantScope::UpTo(Duration::from_secs(3600));
    let (id, _o) = r.submit(context(settings(1, up_to_hour)), t0()).unwrap();
    let e = r.approve(&id, &alice, ask(7200), t0()).unwrap_err();
    assert!(e.to_string().contains("at most 1h"), "{e}");
    let with_edit = ApprovalAsk {
        edit: Some("DELETE FROM orders WHERE id = 2".into()),
        ..ask(60)
    };
    let e = r.approve(&id, &alice, with_edit, t0()).unwrap_err();
    assert_eq!(e.http_status(), 403);
    assert!(r.show(&id).unwrap().approvals.is_empty());
    assert!(matches!(
        r.approve(&id, &alice, ask(1800), t0()),
        Ok(ApprovalEffect::Approved { grant: Some(d), .. }) if d == Duration::from_secs(1800)
    ));

    // With two approvals, a grant needs both to ask; the shortest counts.
    let (id, _o) = r.submit(context(settings(2, up_to_hour)), t0()).unwrap();
    r.approve(&id, &alice, ask(1800), t0()).unwrap();
    assert!(matches!(
        r.approve(&id, &bob, ask(600), t0()),
        Ok(ApprovalEffect::Approved { grant: Some(d), .. }) if d == Duration::from_secs(600)
    ));
    let (id, _o) = r.submit(context(settings(2, up_to_hour)), t0()).unwrap();
    r.approve(&id, &alice, ask(1800), t0()).unwrap();
    assert!(matches!(
        r.approve(&id, &bob, approve("this once"), t0()),
        Ok(ApprovalEffect::Approved { grant: None, .. })
    ));

    // Nothing to grant to: no shape, or no identity.
    let mut unparsable = context(settings(1, up_to_hour));
    unparsable.fingerprint = None;
    let (id, _o) = r.submit(unparsable, t0()).unwrap();
    assert!(r.approve(&id, &alice, ask(60), t0()).is_err());
    let mut nobody = context(settings(1, up_to_hour));
    nobody.identity = ProcessIdentity::default();
    let (id, _o) = r.submit(nobody, t0()).unwrap();
    assert!(r.approve(&id, &alice, ask(60), t0()).is_err());
}

#[test]
fn unknown_requests_are_404() {
    let r = registry();
    let id = RequestId::new(t0());
    let alice = reviewer(2001, "alice", &["dba"]);
    let e = r.approve(&id, &alice, approve("ok"), t0()).unwrap_err();
    assert_eq!(e, ApprovalError::UnknownRequest);
    assert_eq!(e.http_status(), 404);
    assert!(r.show(&id).is_none());
}

#[test]
fn request_ids_sort_by_time_and_parse_back() {
    let early = RequestId::new(t0());
    let late = RequestId::new(t0() + Duration::from_millis(1));
    assert!(early < late, "{early} < {late}");
    assert_eq!(early.as_str().len(), 26);
    assert!(early.as_str().starts_with("01"), "{early}");
    assert_eq!(
        RequestId::parse(&early.as_str().to_lowercase()),
        Some(early.clone())
    );
    assert_ne!(RequestId::new(t0()), RequestId::new(t0()));
    for bad in [
        "",
        "01KB",
        "01KBM3XYZXYZXYZXYZXYZXYZXU",
        "81KBM3XYZXYZXYZXYZXYZXYZXY",
        "../../etc/passwd",
    ] {
        assert_eq!(RequestId::parse(bad), None, "{bad}");
    }
}

#[test]
fn reviewers_are_named_from_passwd_and_group() {
    let passwd =
        "# users\nroot:x:0:0:root:/root:/bin/sh\nalice:x:2001:2001::/home/alice:/bin/sh\n+nis\n";
    let group = "root:x:0:\nalice:x:2001:\ndba:x:3000:bob,alice\nstaff:x:50:bob\n-nis\n";
    assert_eq!(user_name(passwd, 2001).as_deref(), Some("alice"));
    assert_eq!(user_name(passwd, 4242), None);
    assert_eq!(groups_of(group, "alice", 2001), ["alice", "dba"]);
    assert_eq!(groups_of(group, "bob", 100), ["dba", "staff"]);
    // A user whose name is a prefix of a member's is not that member.
    assert!(groups_of(group, "bo", 100).is_empty());
}

#[test]
fn grant_identity_is_the_ci_workflow_or_the_executable() {
    let id = requester();
    assert_eq!(
        GrantSubject::identity_key(&id).as_deref(),
        Some("ci:github_actions:acme/shop:deploy")
    );
    let mut unverified = requester();
    if let Some(ci) = unverified.ci.as_mut() {
        ci.verified = false;
    }
    unverified.exe_sha256 = Some("ab".repeat(32));
    assert_eq!(
        GrantSubject::identity_key(&unverified),
        Some(format!("exe:/usr/bin/psql@sha256:{}", "ab".repeat(32)))
    );
    assert_eq!(
        GrantSubject::identity_key(&ProcessIdentity::default()),
        None
    );
}

fn grant(subject: GrantSubject, now: SystemTime, seconds: u64) -> Grant {
    Grant {
        id: RequestId::new(now),
        subject,
        statement: "DELETE FROM orders WHERE id = 1".into(),
        request: RequestId::new(now),
        session: None,
        rule: "review-deletes".into(),
        approved_by: vec!["alice".into()],
        created_at: unix_seconds(now),
        expires_at: unix_seconds(now) + seconds,
        revoked_by: None,
        revoked_via: None,
        revoked_at: None,
    }
}

#[test]
fn grants_are_in_force_only_inside_the_rules_daily_hours() {
    let dir = tempfile::tempdir().unwrap();
    let now = SystemTime::now();
    let desk = Desk {
        registry: Arc::new(registry()),
        grants: Arc::new(GrantStore::open(&dir.path().join("grants.redb"), now).unwrap()),
    };
    let identity = requester();
    let subject = GrantSubject {
        target: "prod".into(),
        fingerprint: "abc123".into(),
        identity: GrantSubject::identity_key(&identity).unwrap(),
    };
    desk.grants.insert(&grant(subject, now, 3600)).unwrap();
    let minute = super::hold::local_minute(now).expect("the local time is readable");
    let at = |m: u16| m % (24 * 60);
    let window = |start: u16, end: u16| {
        let text = format!(
            "{:02}:{:02}-{:02}:{:02}",
            start / 60,
            start % 60,
            end / 60,
            end % 60
        );
        crate::policy::DailyWindow::parse(&text).unwrap()
    };
    let find = |hours| desk.grant_for("prod", "abc123", &identity, hours, now);
    assert!(find(None).is_some(), "no window: the grant is in force");
    // A window from a minute ago to two minutes from now holds this
    // minute (across midnight too); one that opens in two minutes does not.
    let inside = window(at(minute + 24 * 60 - 1), at(minute + 2));
    assert!(find(Some(inside)).is_some(), "inside {inside}");
    let outside = window(at(minute + 2), at(minute + 24 * 60 - 1));
    assert!(find(Some(outside)).is_none(), "outside {outside}");
}

#[test]
fn grants_persist_expire_and_revoke() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state/approvals.redb");
    let subject = GrantSubject {
        target: "prod".into(),
        fingerprint: "abc123".into(),
        identity: "ci:github_actions:acme/shop:deploy".into(),
    };
    let other = GrantSubject {
        target: "stage".into(),
        ..subject.clone()
    };
    let g = grant(subject.clone(), t0(), 1800);
    {
        let store = GrantStore::open(&path, t0()).unwrap();
        assert!(store.find(&subject, t0()).unwrap().is_none());
        store.insert(&g).unwrap();
    }
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Reopened, as after a restart.
    let store = GrantStore::open(&path, t0()).unwrap();
    assert_eq!(store.find(&subject, t0()).unwrap(), Some(g.clone()));
    assert_eq!(store.find(&other, t0()).unwrap(), None);
    let later = t0() + Duration::from_secs(1800);
    assert_eq!(store.find(&subject, later).unwrap(), None);
    assert!(store.active(later).unwrap().is_empty());
    assert_eq!(store.all().unwrap().len(), 1);
    assert_eq!(
        store.revoke(&g.id, "bob", "unix:2002", later),
        Err(ApprovalError::GrantEnded("the grant has expired".into()))
    );

    let g2 = grant(subject.clone(), t0(), 3600);
    store.insert(&g2).unwrap();
    let revoked = store.revoke(&g2.id, "bob", "unix:2002", t0()).unwrap();
    assert_eq!(revoked.revoked_by.as_deref(), Some("bob"));
    assert_eq!(revoked.revoked_via.as_deref(), Some("unix:2002"));
    // Only the first grant is still in force.
    assert_eq!(store.active(t0()).unwrap(), vec![g.clone()]);
    assert!(matches!(
        store.revoke(&g2.id, "bob", "unix:2002", t0()),
        Err(ApprovalError::GrantEnded(_))
    ));
    assert_eq!(
        store.revoke(&RequestId::new(t0()), "bob", "unix:2002", t0()),
        Err(ApprovalError::UnknownGrant)
    );
    drop(store);
    // Long-ended grants are removed when the store opens.
    let much_later = t0() + Duration::from_secs(40 * 86_400);
    let store = GrantStore::open(&path, much_later).unwrap();
    assert!(store.all().unwrap().is_empty());
}

#[test]
fn review_rules_are_checked_against_the_reviewer_groups() {
    let policy = |approvers: &str, approvals: u32| {
        crate::policy::PolicySet::from_str(
            std::path::Path::new("p.toml"),
            &format!("[[rule]]\nname = \"r\"\naction = \"review\"\napprovers = {approvers}\napprovals = {approvals}\n"),
        )
        .unwrap()
    };
    let mut groups = BTreeMap::new();
    groups.insert(
        "oncall".to_owned(),
        vec!["alice".to_owned(), "bob".to_owned()],
    );
    groups.insert("leads".to_owned(), vec!["bob".to_owned()]);
    let ok = |p: &crate::policy::PolicySet| check_review_rules(p, &groups);
    assert_eq!(ok(&policy("[\"reviewers:oncall\"]", 2)), Ok(()));
    assert_eq!(
        ok(&policy("[\"reviewers:oncall\", \"reviewers:leads\"]", 2)),
        Ok(())
    );
    assert_eq!(
        ok(&policy("[\"reviewers:oncall\", \"reviewers:leads\"]", 3)),
        Err("rule \"r\" needs 3 approvals, but its approver groups have only 2 users".into())
    );
    // Unix groups change at run time: not counted.
    assert_eq!(
        ok(&policy("[\"reviewers:leads\", \"group:dba\"]", 5)),
        Ok(())
    );
    assert_eq!(
        ok(&policy("[\"reviewers:nobody-here\"]", 1)),
        Err("rule \"r\" names approvers \"reviewers:nobody-here\", but the configuration has no [reviewers.nobody-here]".into())
    );
}

// ---- the API over a real Unix socket, as this process ----------------------

/// This process's uid, user name and primary group name.
fn me() -> (u32, String, String) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata("/proc/self").unwrap();
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let user = user_name(&passwd, meta.uid()).unwrap_or_else(|| meta.uid().to_string());
    let primary = groups_of(&group, "", meta.gid());
    (
        meta.uid(),
        user,
        primary.first().cloned().unwrap_or_default(),
    )
}

/// The session events the reviewer API emitted.
#[derive(Default)]
struct Emitted(std::sync::Mutex<Vec<(uuid::Uuid, crate::events::ReviewUpdate)>>);

impl crate::events::EventSink for Emitted {
    fn emit(&self, event: &crate::events::SessionEvent) {
        if let crate::events::SessionEvent::Review { session, review } = event {
            self.0.lock().unwrap().push((*session, (**review).clone()));
        }
    }
}

/// An API on a socket in `dir`, whose only review rule's approvers are
/// `group` (this process's primary group, so that this process reviews).
fn api_in(
    dir: &std::path::Path,
    group: &str,
) -> (Arc<Registry>, Arc<GrantStore>, std::path::PathBuf) {
    let (registry, grants, socket, _) = api_emitting_in(dir, group);
    (registry, grants, socket)
}

/// [`api_in`], with what the API emits for sessions' recordings.
fn api_emitting_in(
    dir: &std::path::Path,
    group: &str,
) -> (
    Arc<Registry>,
    Arc<GrantStore>,
    std::path::PathBuf,
    Arc<Emitted>,
) {
    let emitted = Arc::new(Emitted::default());
    let registry = Arc::new(registry());
    let grants = Arc::new(GrantStore::open(&dir.join("grants.redb"), SystemTime::now()).unwrap());
    let rule = format!(
        "[[rule]]\nname = \"review-deletes\"\naction = \"review\"\napprovers = \"group:{group}\"\ngrant = \"1h\"\n"
    );
    let policy = crate::policy::PolicySet::from_str(std::path::Path::new("p.toml"), &rule).unwrap();
    let socket = dir.join("approvals.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let state = Arc::new(api::ApiState {
        registry: registry.clone(),
        grants: grants.clone(),
        identity: Arc::new(crate::identity::IdentityResolver::new()),
        policy: crate::policy::SharedPolicy::new(policy),
        reviewer_groups: BTreeMap::new(),
        etc: "/etc".into(),
        tokens: Arc::new(super::tokens::TokenStore::new(dir.join("tokens"))),
        events: Some(crate::events::Events::new(emitted.clone())),
    });
    let endpoint = crate::accept::Endpoint::new(
        "reviewer",
        api::MAX_CONNECTIONS,
        crate::accept::WhenFull::Wait,
        &tokio_util::task::TaskTracker::new(),
        Arc::default(),
    );
    tokio::spawn(api::serve(
        listener,
        state,
        endpoint,
        tokio_util::sync::CancellationToken::new(),
    ));
    (registry, grants, socket, emitted)
}

/// A request from `requester_uid`, approvable by members of `group`.
fn held_for(group: &str, requester_uid: u32, grant: GrantScope) -> RequestContext {
    let mut review = (*settings(1, grant)).clone();
    review.approvers = vec![Approver::UnixGroup(group.into())];
    let mut ctx = context(Arc::new(review));
    ctx.identity.uid = Some(requester_uid);
    ctx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_approves_denies_and_grants_for_an_approver() {
    let (uid, user, group) = me();
    let other = uid.wrapping_add(1);
    let dir = tempfile::tempdir().unwrap();
    let (registry, grants, socket, emitted) = api_emitting_in(dir.path(), &group);
    let call = |method: hyper::Method, path: String, body: Option<serde_json::Value>| {
        let socket = socket.clone();
        async move {
            client::call(&socket, method, &path, body.as_ref())
                .await
                .unwrap()
        }
    };
    let hour = GrantScope::UpTo(Duration::from_secs(3600));

    // Approved with a grant: the held session gets the text, the grant is
    // stored and recorded in the requesting session.
    let requester = uuid::Uuid::now_v7();
    let mut held = held_for(&group, other, hour);
    held.session = Some(requester.to_string());
    let (id, outcome) = registry.submit(held, SystemTime::now()).unwrap();
    let (status, listed) = call(hyper::Method::GET, "/v1/requests".into(), None).await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["context"]["rule"], "review-deletes");
    let (status, answer) = call(
        hyper::Method::POST,
        format!("/v1/requests/{id}/approve"),
        Some(serde_json::json!({"reason": "fine", "grant": "30m"})),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "approved");
    assert_eq!(
        outcome.await.unwrap(),
        Outcome::Approved {
            text: "DELETE FROM orders WHERE id = 1".into(),
            edited: false,
            by: vec![user.clone()],
        }
    );
    let stored = grants.active(SystemTime::now()).unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(
        stored[0].subject.identity,
        "ci:github_actions:acme/shop:deploy"
    );
    assert_eq!(stored[0].expires_at - stored[0].created_at, 1800);
    let given: Vec<_> = emitted.0.lock().unwrap().drain(..).collect();
    match given.as_slice() {
        [(session, crate::events::ReviewUpdate::GrantGiven(g))] => {
            assert_eq!(*session, requester);
            assert_eq!(g.grant, stored[0].id.as_str());
            assert_eq!(g.request, id.as_str());
            assert_eq!(g.approved_by, vec![user.clone()]);
            assert_eq!(g.identity, "ci:github_actions:acme/shop:deploy");
        }
        other => panic!("expected one grant_given event, got {other:?}"),
    }
    // Revoked: recorded in the requesting session and in a session that ran
    // under the grant, with the reviewer and how it authenticated.
    let user_of_grant = uuid::Uuid::now_v7();
    registry.note_grant_use(&stored[0].id, user_of_grant);
    let (status, answer) = call(
        hyper::Method::DELETE,
        format!("/v1/grants/{}", stored[0].id),
        None,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let revoked: Vec<_> = emitted.0.lock().unwrap().drain(..).collect();
    let told: Vec<uuid::Uuid> = revoked.iter().map(|(s, _)| *s).collect();
    assert_eq!(told, vec![requester, user_of_grant]);
    for (_, update) in &revoked {
        match update {
            crate::events::ReviewUpdate::GrantRevoked(r) => {
                assert_eq!(r.grant, stored[0].id.as_str());
                assert_eq!(r.by, user);
                assert_eq!(r.via, format!("unix:{uid}"));
            }
            other => panic!("expected grant_revoked, got {other:?}"),
        }
    }
    assert!(grants.active(SystemTime::now()).unwrap().is_empty());
    let (status, _) = call(
        hyper::Method::POST,
        format!("/v1/requests/{id}/approve"),
        Some(serde_json::json!({})),
    )
    .await;
    assert_eq!(status, 409);

    // Denied: the reason and the reviewer reach the session.
    let (id, outcome) = registry
        .submit(
            held_for(&group, other, GrantScope::Statement),
            SystemTime::now(),
        )
        .unwrap();
    let (status, answer) = call(
        hyper::Method::POST,
        format!("/v1/requests/{id}/deny"),
        Some(serde_json::json!({"reason": "not today"})),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        outcome.await.unwrap(),
        Outcome::Denied {
            by: user.clone(),
            reason: "not today".into(),
            via: format!("unix:{uid}"),
        }
    );

    // The requester itself is refused, and nothing changes.
    let (id, mut outcome) = registry
        .submit(
            held_for(&group, uid, GrantScope::Statement),
            SystemTime::now(),
        )
        .unwrap();
    let (status, answer) = call(
        hyper::Method::POST,
        format!("/v1/requests/{id}/approve"),
        Some(serde_json::json!({})),
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("sent the statement"),
        "{answer}"
    );
    assert_eq!(outcome.try_recv(), Err(TryRecvError::Empty));
    // A grant the rule does not allow: refused, still pending.
    let (id, mut outcome) = registry
        .submit(
            held_for(&group, other, GrantScope::Statement),
            SystemTime::now(),
        )
        .unwrap();
    let (status, _) = call(
        hyper::Method::POST,
        format!("/v1/requests/{id}/approve"),
        Some(serde_json::json!({"grant": "5m"})),
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(outcome.try_recv(), Err(TryRecvError::Empty));
    assert_eq!(registry.list().len(), 2);
}

// ---- holding one statement ----------------------------------------------------

fn review_decision(review: Option<Arc<ReviewSettings>>) -> crate::policy::Decision {
    crate::policy::Decision {
        action: crate::policy::Action::Review,
        matched: vec![crate::policy::MatchedRule {
            name: "review-deletes".into(),
            action: crate::policy::Action::Review,
            message: Some("deletes need a second pair of eyes".into()),
            file: "p.toml".into(),
            mask: None,
            review,
            on_match: None,
        }],
        default_used: false,
        reason: "rule \"review-deletes\" (review)".into(),
    }
}

fn held_statement(identity: &ProcessIdentity) -> HeldStatement<'_> {
    HeldStatement {
        target: "prod",
        database_user: Some("app"),
        text: "DELETE FROM orders WHERE id = 1",
        shown: None,
        hidden_literals: Some(0),
        session_so_far: Vec::new(),
        fingerprint: Some("abc123"),
        identity,
        session: "s1",
    }
}

#[tokio::test]
async fn a_hold_is_answered_by_its_outcome_and_cancelled_when_dropped() {
    let registry = Arc::new(registry());
    let identity = requester();
    let decision = review_decision(Some(settings(1, GrantScope::Statement)));
    let hold = Hold::submit(&registry, &decision, held_statement(&identity), t0())
        .unwrap()
        .unwrap();
    let id = hold.id().clone();
    assert_eq!(
        hold.notice(),
        format!("tollgate: statement held for review (request {id}), waiting up to 10m; approve with: tollgate approvals approve {id}")
    );
    let view = registry.show(&id).unwrap();
    assert_eq!(view.context.rule, "review-deletes");
    assert_eq!(
        view.context.rule_message.as_deref(),
        Some("deletes need a second pair of eyes")
    );
    assert_eq!(view.context.database_user.as_deref(), Some("app"));
    assert_eq!(view.context.identity, identity);

    let alice = reviewer(2001, "alice", &["dba"]);
    registry.approve(&id, &alice, approve("ok"), t0()).unwrap();
    let outcome = hold.outcome().await;
    assert!(matches!(outcome, Outcome::Approved { .. }), "{outcome:?}");
    assert_eq!(outcome.client_error(Duration::from_secs(600)), None);
    // Decided before it was dropped: still approved.
    assert!(matches!(
        registry.show(&id).and_then(|v| v.outcome),
        Some(Outcome::Approved { .. })
    ));

    // The client goes away while waiting: the request is cancelled.
    let hold = Hold::submit(&registry, &decision, held_statement(&identity), t0())
        .unwrap()
        .unwrap();
    let id = hold.id().clone();
    drop(hold);
    assert_eq!(
        registry.show(&id).and_then(|v| v.outcome),
        Some(Outcome::Cancelled)
    );
    assert!(registry.list().is_empty());

    // The agent stops while waiting.
    let hold = Hold::submit(&registry, &decision, held_statement(&identity), t0())
        .unwrap()
        .unwrap();
    registry.abort_all();
    assert_eq!(hold.outcome().await, Outcome::Aborted);
}

#[test]
fn a_review_without_settings_is_not_held() {
    let registry = Arc::new(registry());
    let identity = requester();
    let decision = review_decision(None);
    assert!(Hold::submit(&registry, &decision, held_statement(&identity), t0()).is_none());
    let mut by_default = review_decision(None);
    by_default.matched.clear();
    by_default.default_used = true;
    assert!(Hold::submit(&registry, &by_default, held_statement(&identity), t0()).is_none());
    assert!(registry.list().is_empty());
}

#[test]
fn outcomes_are_worded_for_the_client() {
    let ten = Duration::from_secs(600);
    #[rustfmt::skip]
    let cases = [
        (Outcome::Denied { by: "alice".into(), reason: "not during the sale".into(), via: "unix:2001".into() },
         "tollgate: statement denied by reviewer alice: not during the sale"),
        (Outcome::Expired, "tollgate: statement not approved within 10m; the review request expired"),
        (Outcome::Cancelled, "tollgate: review request cancelled"),
        (Outcome::Aborted, "tollgate: review request aborted: the agent stopped before a decision"),
    ];
    for (outcome, want) in cases {
        assert_eq!(outcome.client_error(ten).as_deref(), Some(want));
    }
}

#[test]
fn every_change_of_a_request_is_broadcast_in_order() {
    use tokio::sync::broadcast::error::TryRecvError;
    let r = registry();
    let mut events = r.subscribe();
    let next = |events: &mut tokio::sync::broadcast::Receiver<RequestEvent>| {
        let e = events.try_recv().unwrap();
        (e.event, e.request.id.clone(), e.at)
    };
    let alice = reviewer(2001, "alice", &["dba"]);
    let bob = reviewer(2002, "bob", &["dba"]);

    // Two approvals needed; an edit restarts the count.
    let (a, _outcome_a) = r
        .submit(context(settings(2, GrantScope::Statement)), t0())
        .unwrap();
    assert_eq!(
        next(&mut events),
        (RequestEventKind::Requested, a.clone(), unix_seconds(t0()))
    );
    r.approve(&a, &alice, approve("ok"), t0() + Duration::from_secs(5))
        .unwrap();
    let counted = events.try_recv().unwrap();
    assert_eq!(counted.event, RequestEventKind::ApprovalCounted);
    assert_eq!(counted.at, unix_seconds(t0()) + 5);
    assert_eq!(counted.request.approvals.len(), 1);
    let edit = ApprovalAsk {
        edit: Some("DELETE FROM orders WHERE id = 1 AND false".into()),
        ..ApprovalAsk::default()
    };
    r.approve(&a, &bob, edit, t0()).unwrap();
    let edited = events.try_recv().unwrap();
    assert_eq!(edited.event, RequestEventKind::Edited);
    assert_eq!(edited.request.edited_by.as_deref(), Some("bob"));
    assert_eq!(next(&mut events).0, RequestEventKind::ApprovalCounted);
    r.approve(&a, &alice, approve("ok"), t0()).unwrap();
    let approved = events.try_recv().unwrap();
    assert_eq!(approved.event, RequestEventKind::Approved);
    assert!(matches!(
        approved.request.outcome,
        Some(Outcome::Approved { edited: true, .. })
    ));

    // Denied, expired, cancelled, aborted.
    let one = || context(settings(1, GrantScope::Statement));
    let (d, _od) = r.submit(one(), t0()).unwrap();
    r.deny(&d, &alice, "no".into(), t0()).unwrap();
    let (e, _oe) = r.submit(one(), t0()).unwrap();
    r.expire_due(t0() + Duration::from_secs(600));
    let (c, _oc) = r.submit(one(), t0()).unwrap();
    r.cancel(&c);
    let (x, _ox) = r.submit(one(), t0()).unwrap();
    r.abort_all();
    let rest: Vec<(RequestEventKind, RequestId)> = std::iter::from_fn(|| {
        events
            .try_recv()
            .ok()
            .map(|e| (e.event, e.request.id.clone()))
    })
    .collect();
    assert_eq!(
        rest,
        vec![
            (RequestEventKind::Requested, d.clone()),
            (RequestEventKind::Denied, d),
            (RequestEventKind::Requested, e.clone()),
            (RequestEventKind::Expired, e),
            (RequestEventKind::Requested, c.clone()),
            (RequestEventKind::Cancelled, c),
            (RequestEventKind::Requested, x.clone()),
            (RequestEventKind::Aborted, x),
        ]
    );
    assert_eq!(events.try_recv().unwrap_err(), TryRecvError::Empty);
}

#[test]
fn a_watcher_gets_the_pending_requests_then_later_events_and_a_slow_one_lags() {
    let r = registry();
    let (first, _o1) = r
        .submit(context(settings(1, GrantScope::Statement)), t0())
        .unwrap();
    let (pending, mut events) = r.watch();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].id, first);
    // Nothing before the watch is sent again.
    assert!(events.try_recv().is_err());
    let mut outcomes = Vec::new();
    for _ in 0..1100 {
        let (id, outcome) = r
            .submit(context(settings(1, GrantScope::Statement)), t0())
            .unwrap();
        r.cancel(&id);
        outcomes.push(outcome);
    }
    // The registry did not wait for the slow watcher; it is told it lagged.
    match events.try_recv() {
        Err(tokio::sync::broadcast::error::TryRecvError::Lagged(missed)) => {
            assert_eq!(missed, 2200 - 1024)
        }
        other => panic!("expected a lag, got {other:?}"),
    }
    assert!(events.try_recv().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_stream_is_server_sent_events_starting_with_the_pending_requests() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (uid, _user, group) = me();
    let dir = tempfile::tempdir().unwrap();
    let (registry, _grants, socket) = api_in(dir.path(), &group);
    let (first, _o1) = registry
        .submit(
            held_for(&group, uid.wrapping_add(1), GrantScope::Statement),
            SystemTime::now(),
        )
        .unwrap();

    let mut stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
    stream
        .write_all(b"GET /v1/watch HTTP/1.1\r\nHost: tollgate\r\n\r\n")
        .await
        .unwrap();
    let mut seen = String::new();
    let mut chunk = [0u8; 8192];
    let mut read_until = async |stream: &mut tokio::net::UnixStream, needle: &str| {
        while !seen.contains(needle) {
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "the stream ended: {seen}");
            seen.push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
        seen.clone()
    };
    let head = read_until(&mut stream, "\"event\":\"pending\"").await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("content-type: text/event-stream\r\n"),
        "{head}"
    );
    assert!(head.contains(&format!("\"id\":\"{first}\"")), "{head}");

    let (second, _o2) = registry
        .submit(
            held_for(&group, uid.wrapping_add(1), GrantScope::Statement),
            SystemTime::now(),
        )
        .unwrap();
    let later = read_until(&mut stream, "\"event\":\"requested\"").await;
    // One JSON object per `data:` line.
    let requested = later
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|json| serde_json::from_str::<serde_json::Value>(json).unwrap())
        .find(|v| v["event"] == "requested")
        .unwrap();
    assert_eq!(requested["request"]["id"], second.as_str());
    assert!(requested["at"].as_u64().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whoami_names_the_authenticated_reviewer_and_how_they_signed_in() {
    let (uid, user, group) = me();
    let dir = tempfile::tempdir().unwrap();
    let (_registry, _grants, socket) = api_in(dir.path(), &group);

    let (status, answer) = client::call(&socket, hyper::Method::GET, "/v1/whoami", None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer,
        serde_json::json!({ "user": user, "uid": uid, "via": format!("unix:{uid}") })
    );
    // Read-only: other methods are refused.
    let (status, answer) = client::call(&socket, hyper::Method::POST, "/v1/whoami", None)
        .await
        .unwrap();
    assert_eq!(status, 405, "{answer}");
}
