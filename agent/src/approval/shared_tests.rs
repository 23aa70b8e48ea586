//! The round trip of a request between an agent and the review server,
//! without the database between them: what one side writes into the row,
//! the other reads back and decides or applies.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use super::*;
use crate::approval::GrantStore;
use crate::approval::{ApprovalAsk, ApprovalEffect, ApprovalError, RequestContext, Reviewer};
use crate::identity::ProcessIdentity;
use crate::policy::{Approver, GrantScope, ReviewSettings};

fn held() -> RequestContext {
    RequestContext {
        target: "prod".into(),
        database_user: Some("app".into()),
        statement: "DELETE FROM customers WHERE email = '***'".into(),
        run_text: "DELETE FROM customers WHERE email = 'ada@example.com'".into(),
        hidden_literals: Some(1),
        session_so_far: Vec::new(),
        fingerprint: Some("abc".into()),
        rule: "review-deletes".into(),
        rule_message: None,
        review: Arc::new(ReviewSettings {
            approvers: vec![Approver::UnixGroup("dba".into())],
            approvals: 2,
            timeout: Duration::from_secs(600),
            grant: GrantScope::UpTo(Duration::from_secs(3600)),
            grant_hours: None,
        }),
        identity: ProcessIdentity {
            uid: Some(1001),
            cgroup: Some("/ci/job-7".into()),
            ..ProcessIdentity::default()
        },
        session: Some("s1".into()),
    }
}

fn dba(uid: u32, user: &str) -> Reviewer {
    Reviewer {
        uid,
        user: user.into(),
        groups: vec!["dba".into()],
        cgroup: None,
        ci_actor: None,
        via: format!("token:{user}"),
    }
}

/// The row as the agent writes it, read back by the review server.
fn through_the_row(view: &RequestView) -> RequestView {
    let text = serde_json::to_string(view).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn the_row_never_carries_the_text_that_runs_and_an_unedited_approval_runs_the_agents_own() {
    let now = UNIX_EPOCH + Duration::from_secs(1_780_000_000);
    let agent = Registry::new(BTreeMap::new());
    let (id, mut waiting) = agent.submit(held(), now).unwrap();
    let row = serde_json::to_string(&agent.show(&id).unwrap()).unwrap();
    assert!(!row.contains("ada@example.com"), "{row}");

    let server = Registry::new(BTreeMap::new());
    let mut copy = through_the_row(&agent.show(&id).unwrap());
    copy.host = Some("runner-a".into());
    let mut decided = server.adopt(copy.clone(), now).unwrap();
    assert!(server.adopt(copy, now).is_none(), "a request is taken once");
    // The same checks as on the agent: N of M, never the requester.
    let requester = dba(1001, "job");
    assert!(matches!(
        server.approve(&id, &requester, ApprovalAsk::default(), now),
        Err(ApprovalError::SelfApproval(_))
    ));
    assert_eq!(
        server
            .approve(&id, &dba(2001, "alice"), ApprovalAsk::default(), now)
            .unwrap(),
        ApprovalEffect::Counted { have: 1, need: 2 }
    );
    server
        .approve(&id, &dba(2002, "bob"), ApprovalAsk::default(), now)
        .unwrap();
    let outcome = decided.try_recv().unwrap();
    let decision = Decision::of(&outcome, server.show(&id).as_ref(), None).unwrap();
    let row = serde_json::to_string(&decision).unwrap();
    assert!(!row.contains("ada@example.com"), "{row}");
    let decision: Decision = serde_json::from_str(&row).unwrap();

    assert!(agent.settle(&id, now, |view| decision.outcome(view)));
    assert_eq!(
        waiting.try_recv().unwrap(),
        Outcome::Approved {
            text: "DELETE FROM customers WHERE email = 'ada@example.com'".into(),
            edited: false,
            by: vec!["alice".into(), "bob".into()],
        }
    );
    let recorded = agent.show(&id).unwrap();
    let by: Vec<&str> = recorded.approvals.iter().map(|a| a.by.as_str()).collect();
    assert_eq!(
        by,
        ["alice", "bob"],
        "the approvals are noted for the recording"
    );
    assert!(
        !agent.settle(&id, now, |_| Outcome::Expired),
        "an ended request takes no second outcome"
    );
}

#[test]
fn an_edit_runs_as_the_reviewer_wrote_it_and_expiries_are_no_decisions() {
    let now = UNIX_EPOCH + Duration::from_secs(1_780_000_000);
    let mut context = held();
    context.review = Arc::new(ReviewSettings {
        approvals: 1,
        ..(*context.review).clone()
    });
    let agent = Registry::new(BTreeMap::new());
    let (id, mut waiting) = agent.submit(context, now).unwrap();
    let server = Registry::new(BTreeMap::new());
    let mut decided = server
        .adopt(through_the_row(&agent.show(&id).unwrap()), now)
        .unwrap();
    let edit = ApprovalAsk {
        edit: Some("DELETE FROM customers WHERE id = 7".into()),
        ..ApprovalAsk::default()
    };
    server.approve(&id, &dba(2001, "alice"), edit, now).unwrap();
    let decision = Decision::of(
        &decided.try_recv().unwrap(),
        server.show(&id).as_ref(),
        None,
    )
    .unwrap();
    assert!(agent.settle(&id, now, |view| decision.outcome(view)));
    assert_eq!(
        waiting.try_recv().unwrap(),
        Outcome::Approved {
            text: "DELETE FROM customers WHERE id = 7".into(),
            edited: true,
            by: vec!["alice".into()],
        }
    );
    assert_eq!(agent.show(&id).unwrap().edited_by.as_deref(), Some("alice"));
    for ended in [Outcome::Expired, Outcome::Cancelled, Outcome::Aborted] {
        assert!(Decision::of(&ended, None, None).is_none(), "{ended:?}");
    }
    let denied = Outcome::Denied {
        by: "bob".into(),
        reason: "no".into(),
        via: "unix:2".into(),
    };
    assert_eq!(Decision::of(&denied, None, None).unwrap().state(), "denied");
}

#[test]
fn an_adopted_request_expires_at_its_agents_deadline() {
    let now = UNIX_EPOCH + Duration::from_secs(1_780_000_000);
    let agent = Registry::new(BTreeMap::new());
    let (id, _waiting) = agent.submit(held(), now).unwrap();
    let server = Registry::new(BTreeMap::new());
    let mut decided = server
        .adopt(through_the_row(&agent.show(&id).unwrap()), now)
        .unwrap();
    assert!(server.expire_due(now + Duration::from_secs(599)).is_empty());
    assert_eq!(server.expire_due(now + Duration::from_secs(600)), [id]);
    assert_eq!(decided.try_recv().unwrap(), Outcome::Expired);
}

#[test]
fn a_grant_from_the_fleet_is_added_once_and_a_revocation_is_never_undone() {
    let now = UNIX_EPOCH + Duration::from_secs(1_780_000_000);
    let dir = tempfile::tempdir().unwrap();
    let here = GrantStore::open(&dir.path().join("here.redb"), now).unwrap();
    let elsewhere = GrantStore::open(&dir.path().join("elsewhere.redb"), now).unwrap();
    let subject = crate::approval::GrantSubject {
        target: "prod".into(),
        fingerprint: "abc".into(),
        identity: "ci:github_actions:acme/shop:deploy".into(),
    };
    let given = Grant {
        id: RequestId::new(now),
        subject: subject.clone(),
        statement: "DELETE FROM orders WHERE id = ?".into(),
        request: RequestId::new(now),
        session: None,
        rule: "review-deletes".into(),
        approved_by: vec!["alice".into()],
        created_at: unix_seconds(now),
        expires_at: unix_seconds(now) + 600,
        revoked_by: None,
        revoked_via: None,
        revoked_at: None,
    };
    elsewhere.insert(&given).unwrap();
    // Through the row: the JSON the table keeps.
    let row =
        |g: &Grant| -> Grant { serde_json::from_str(&serde_json::to_string(g).unwrap()).unwrap() };
    assert_eq!(here.merge(&row(&given)).unwrap(), Merged::Added);
    assert_eq!(here.find(&subject, now).unwrap(), Some(given.clone()));
    assert_eq!(here.merge(&row(&given)).unwrap(), Merged::Unchanged);

    let revoked = elsewhere.revoke(&given.id, "bob", "unix:2", now).unwrap();
    assert_eq!(here.merge(&row(&revoked)).unwrap(), Merged::Revoked);
    assert_eq!(here.find(&subject, now).unwrap(), None);
    assert_eq!(here.get(&given.id).unwrap(), Some(revoked.clone()));
    // A stale copy still in force does not bring it back.
    assert_eq!(here.merge(&row(&given)).unwrap(), Merged::Unchanged);
    assert_eq!(here.find(&subject, now).unwrap(), None);
}

#[tokio::test]
async fn an_unreachable_database_is_reported_with_the_reason() {
    // A port nothing listens on: taken, then given back.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let settings = crate::config::SharedApprovalsSettings {
        database: format!(
            "host=127.0.0.1 port={port} user=tollgate dbname=tollgate sslmode=disable"
        ),
        password_file: None,
        ca_file: None,
        host: "runner-a".into(),
    };
    let Err(why) = connect(&settings, &[DECISIONS_CHANNEL]).await else {
        unreachable!("nothing listens on port {port}");
    };
    assert!(
        why.starts_with("cannot connect: error connecting to server: ") && why.contains("refused"),
        "{why}"
    );
}
