//! The registry's behaviour, case by case, on both engines: SQLite in a
//! temp dir and a real PostgreSQL cluster (made by `initdb`). Each case gets
//! a fresh registry; the same cases run on both, so the SQL both engines
//! share is proven to mean the same thing on each.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use burrow_core::keys::{fingerprint, generate_ed25519, PublicKey};
use burrow_core::time::now_unix;
use burrow_core::Id;
use burrow_server::audit::{AuditQuery, AuditRecord};
use burrow_server::registry::{Backend, Change, HostKeyReport, Registry, RegistryError};
use burrow_server::Identity;

type Case = fn(Registry) -> Pin<Box<dyn Future<Output = ()> + Send>>;

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        const CASES: &[(&str, Case)] = &[$((stringify!($name), |r| Box::pin($name(r)))),*];
    };
}

cases!(
    devices_and_keys,
    operators_and_identify,
    enrollment_tokens,
    tunnel_records,
    pivots_and_dead_pivot_cleanup,
    bans,
    audit_trail,
    leases,
    host_key_reports,
    revision_tracks_identity_changes,
    concurrent_writers_keep_keys_unique,
    migrations_are_numbered_and_idempotent,
    user_ca_rotation_and_certificates,
);

fn id(s: &str) -> Id {
    Id::parse(s).unwrap()
}

fn key() -> PublicKey {
    generate_ed25519().public_key().clone()
}

#[tokio::test]
async fn registry_on_sqlite() {
    for (name, case) in CASES {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path()).await.unwrap();
        assert_eq!(reg.backend(), Backend::Sqlite);
        eprintln!("sqlite: {name}");
        case(reg.clone()).await;
        reg.close().await;
    }
}

#[tokio::test]
async fn registry_on_postgres() {
    let pg = burrow_testkit::Postgres::start();
    for (name, case) in CASES {
        let url = pg.create_database();
        let reg = Registry::open_url(&url).await.unwrap();
        assert_eq!(reg.backend(), Backend::Postgres);
        eprintln!("postgres: {name}");
        case(reg.clone()).await;
        reg.close().await;
    }
}

#[tokio::test]
async fn postgres_notifies_every_listener() {
    let pg = burrow_testkit::Postgres::start();
    let url = pg.create_database();
    let (a, b) = (Registry::open_url(&url).await.unwrap(), Registry::open_url(&url).await.unwrap());
    let mut changes = b.listen().await.unwrap().expect("PostgreSQL listens");
    a.add_device(&id("cam-1"), &key(), &BTreeMap::new(), &[]).await.unwrap();
    assert_eq!(next(&mut changes).await, Change::Identities);
    a.add_ban("203.0.113.0/24", now_unix() + 60, "test", "admin").await.unwrap();
    assert_eq!(next(&mut changes).await, Change::Bans);
    a.revoke_device(&id("cam-1")).await.unwrap();
    assert_eq!(next(&mut changes).await, Change::Identities);
    // Tunnel records and heartbeats change no identity: no notification.
    a.tunnel_up(&id("cam-1"), "a", &[22]).await.unwrap();
    a.remove_device(&id("cam-1")).await.unwrap();
    assert_eq!(next(&mut changes).await, Change::Identities);
    // SQLite has no LISTEN: its pivots poll the revision.
    let dir = tempfile::tempdir().unwrap();
    assert!(Registry::open(dir.path()).await.unwrap().listen().await.unwrap().is_none());
}

#[tokio::test]
async fn postgres_refusals_name_the_url_without_its_password() {
    let port = burrow_testkit::free_port();
    let url = format!("postgres://burrow:s3cret@127.0.0.1:{port}/nothing");
    let err = match Registry::open_url(&url).await {
        Err(e) => e,
        Ok(_) => panic!("nothing listens on {port}"),
    };
    let text = format!("{err}");
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    assert!(!text.contains("s3cret"), "{text}");
    let err = Registry::open_url("mysql://x@y/z").await.err().expect("not PostgreSQL");
    assert!(err.to_string().contains("not a PostgreSQL URL"), "{err}");
}

async fn devices_and_keys(reg: Registry) {
    let (k1, k2) = (key(), key());
    let mut labels = BTreeMap::new();
    labels.insert("site".to_string(), "lyon".to_string());
    reg.add_device(&id("cam-1"), &k1, &labels, &["ssh-ed25519 AAAA host".into()]).await.unwrap();
    assert!(matches!(
        reg.add_device(&id("cam-1"), &k2, &BTreeMap::new(), &[]).await,
        Err(RegistryError::DeviceExists(_))
    ));
    assert!(matches!(
        reg.add_device(&id("cam-2"), &k1, &BTreeMap::new(), &[]).await,
        Err(RegistryError::KeyInUse { .. })
    ));
    let dev = reg.device(&id("cam-1")).await.unwrap().unwrap();
    assert_eq!(dev.fingerprint.as_deref(), Some(fingerprint(&k1).as_str()));
    assert_eq!(dev.labels, labels);
    assert_eq!(dev.host_keys, vec!["ssh-ed25519 AAAA host".to_string()]);
    assert!(dev.last_seen.is_none() && dev.revoked_at.is_none() && !dev.online());
    assert_eq!(reg.identify(&fingerprint(&k1)).await.unwrap(), Some(Identity::Device(id("cam-1"))));
    assert!(reg.key_registered(&fingerprint(&k1)).await.unwrap());
    assert_eq!(reg.near_miss("cam-l").await.unwrap().as_deref(), Some("cam-1"));

    assert!(reg.revoke_device(&id("cam-1")).await.unwrap());
    assert_eq!(reg.identify(&fingerprint(&k1)).await.unwrap(), None);
    let (who, _) = reg.revoked_device(&fingerprint(&k1)).await.unwrap().unwrap();
    assert_eq!(who, "cam-1");
    assert!(reg.remove_device(&id("cam-1")).await.unwrap());
    assert!(!reg.remove_device(&id("cam-1")).await.unwrap());
    assert!(reg.devices().await.unwrap().is_empty());
    // The key is free again.
    reg.add_device(&id("cam-2"), &k1, &BTreeMap::new(), &[]).await.unwrap();
}

async fn operators_and_identify(reg: Registry) {
    let (k1, k2) = (key(), key());
    reg.add_operator(&id("alice"), &k1, true, &[], &[], None).await.unwrap();
    reg.add_operator(&id("bob"), &k2, false, &["site=lyon".into()], &[], None).await.unwrap();
    assert!(matches!(
        reg.add_operator(&id("bob"), &key(), false, &[], &[], None).await,
        Err(RegistryError::OperatorExists(_))
    ));
    assert!(matches!(
        reg.add_device(&id("cam-1"), &k2, &BTreeMap::new(), &[]).await,
        Err(RegistryError::KeyInUse { .. })
    ));
    assert_eq!(
        reg.identify(&fingerprint(&k1)).await.unwrap(),
        Some(Identity::Operator { name: id("alice"), admin: true })
    );
    assert_eq!(
        reg.identify(&fingerprint(&k2)).await.unwrap(),
        Some(Identity::Operator { name: id("bob"), admin: false })
    );
    let ops = reg.operators().await.unwrap();
    assert_eq!(ops.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(), ["alice", "bob"]);
    assert_eq!(ops[1].allow, vec!["site=lyon".to_string()]);
    assert!(reg.remove_operator(&id("bob")).await.unwrap());
    assert_eq!(reg.identify(&fingerprint(&k2)).await.unwrap(), None);
}

async fn enrollment_tokens(reg: Registry) {
    let now = now_unix();
    reg.add_pending_device(&id("cam-1"), &BTreeMap::new(), "digest-1", now + 600).await.unwrap();
    reg.add_pending_device(&id("cam-2"), &BTreeMap::new(), "digest-2", now - 1).await.unwrap();
    assert!(reg.device(&id("cam-1")).await.unwrap().unwrap().fingerprint.is_none());
    assert!(matches!(reg.enroll("digest-x", &id("cam-1"), &key(), &[]).await, Err(RegistryError::TokenInvalid)));
    assert!(matches!(reg.enroll("digest-2", &id("cam-2"), &key(), &[]).await, Err(RegistryError::TokenExpired(_))));
    let k = key();
    reg.enroll("digest-1", &id("cam-1"), &k, &[]).await.unwrap();
    assert_eq!(reg.identify(&fingerprint(&k)).await.unwrap(), Some(Identity::Device(id("cam-1"))));
    assert!(matches!(reg.enroll("digest-1", &id("cam-1"), &key(), &[]).await, Err(RegistryError::TokenUsed)));
    // Rotation needs the current key's fingerprint.
    let k2 = key();
    assert!(matches!(reg.rotate_key(&id("cam-1"), "SHA256:stale", &k2).await, Err(RegistryError::KeyChanged)));
    reg.rotate_key(&id("cam-1"), &fingerprint(&k), &k2).await.unwrap();
    assert_eq!(reg.identify(&fingerprint(&k)).await.unwrap(), None);
    assert_eq!(reg.identify(&fingerprint(&k2)).await.unwrap(), Some(Identity::Device(id("cam-1"))));
}

async fn tunnel_records(reg: Registry) {
    reg.add_device(&id("cam-1"), &key(), &BTreeMap::new(), &[]).await.unwrap();
    reg.add_device(&id("cam-2"), &key(), &BTreeMap::new(), &[]).await.unwrap();
    reg.tunnel_up(&id("cam-1"), "a", &[22, 80]).await.unwrap();
    reg.tunnel_up(&id("cam-2"), "b", &[22]).await.unwrap();
    let dev = reg.device(&id("cam-1")).await.unwrap().unwrap();
    assert_eq!(dev.tunnel_pivot.as_deref(), Some("a"));
    assert_eq!(dev.ports, vec![22, 80]);
    assert!(dev.online() && dev.last_seen.is_some());
    assert_eq!(reg.pivots_with_tunnels().await.unwrap(), ["a", "b"]);
    // A pivot closing a tunnel another pivot took over changes nothing.
    reg.tunnel_down(&id("cam-1"), "b").await.unwrap();
    assert_eq!(reg.device(&id("cam-1")).await.unwrap().unwrap().tunnel_pivot.as_deref(), Some("a"));
    reg.tunnel_down(&id("cam-1"), "a").await.unwrap();
    assert!(reg.device(&id("cam-1")).await.unwrap().unwrap().tunnel_pivot.is_none());
    reg.clear_tunnels("b").await.unwrap();
    assert!(reg.pivots_with_tunnels().await.unwrap().is_empty());
    reg.set_presence(&id("cam-2"), true, Some(now_unix())).await.unwrap();
    assert_eq!(reg.device(&id("cam-2")).await.unwrap().unwrap().presence.as_deref(), Some("online"));
    reg.clear_presence().await.unwrap();
    assert_eq!(reg.device(&id("cam-2")).await.unwrap().unwrap().presence.as_deref(), Some("offline"));
}

async fn pivots_and_dead_pivot_cleanup(reg: Registry) {
    let now = reg.db_now().await.unwrap();
    assert!((now - now_unix()).abs() <= 2, "the database's clock is this machine's");
    assert!(reg.register_pivot("a", "10.0.0.1:22", "ssh-ed25519 AAAA", "boot-a", now).await.unwrap().is_none());
    assert!(reg.register_pivot("b", "10.0.0.2:22", "ssh-ed25519 AAAA", "boot-b", now).await.unwrap().is_none());
    // A second process under the same name is reported; the first then
    // finds its beat refused.
    let replaced = reg.register_pivot("a", "10.0.0.3:22", "ssh-ed25519 AAAA", "boot-a2", now).await.unwrap();
    assert_eq!(replaced.map(|p| p.boot), Some("boot-a".to_string()));
    assert!(!reg.pivot_beat("a", "boot-a", now).await.unwrap());
    assert!(reg.pivot_beat("a", "boot-a2", now).await.unwrap());
    assert_eq!(reg.pivot("a").await.unwrap().unwrap().address, "10.0.0.3:22");

    reg.add_device(&id("cam-1"), &key(), &BTreeMap::new(), &[]).await.unwrap();
    reg.add_device(&id("cam-2"), &key(), &BTreeMap::new(), &[]).await.unwrap();
    reg.add_device(&id("cam-3"), &key(), &BTreeMap::new(), &[]).await.unwrap();
    reg.tunnel_up(&id("cam-1"), "a", &[22]).await.unwrap();
    reg.tunnel_up(&id("cam-2"), "b", &[22]).await.unwrap();
    reg.tunnel_up(&id("cam-3"), "never-registered", &[22]).await.unwrap();
    // All alive: only the record of a pivot that never registered goes.
    assert_eq!(reg.reap_pivots(now).await.unwrap(), 1);
    assert_eq!(reg.pivots().await.unwrap().len(), 2);
    // Later, b beats and a does not: a's records go, and a with them.
    let later = now + burrow_server::registry::PIVOT_DEAD_AFTER + 1;
    assert!(reg.pivot_beat("b", "boot-b", later).await.unwrap());
    assert_eq!(reg.reap_pivots(later).await.unwrap(), 1);
    assert!(reg.device(&id("cam-1")).await.unwrap().unwrap().tunnel_pivot.is_none());
    assert_eq!(reg.device(&id("cam-2")).await.unwrap().unwrap().tunnel_pivot.as_deref(), Some("b"));
    let names: Vec<_> = reg.pivots().await.unwrap().into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["b"]);
    // A pivot taken for dead finds out at its next beat.
    assert!(!reg.pivot_beat("a", "boot-a2", now).await.unwrap());
    reg.unregister_pivot("b", "boot-b").await.unwrap();
    assert!(reg.pivots().await.unwrap().is_empty());
}

async fn bans(reg: Registry) {
    let now = now_unix();
    reg.add_ban("203.0.113.0/24", now + 600, "first", "admin").await.unwrap();
    // A ban in force is only ever lengthened.
    reg.add_ban("203.0.113.0/24", now + 60, "second", "admin").await.unwrap();
    let bans = reg.bans().await.unwrap();
    assert_eq!(bans.len(), 1);
    assert_eq!((bans[0].until, bans[0].reason.as_str()), (now + 600, "second"));
    reg.add_ban("198.51.100.7/32", now + 1200, "x", "pivot a").await.unwrap();
    assert_eq!(reg.bans().await.unwrap().len(), 2);
    assert!(reg.remove_ban("198.51.100.7/32").await.unwrap());
    assert!(!reg.remove_ban("198.51.100.7/32").await.unwrap());
    reg.add_ban("192.0.2.1/32", now - 1, "ran out", "admin").await.unwrap();
    assert_eq!(reg.bans().await.unwrap().len(), 1);
    reg.prune_bans().await.unwrap();
    assert!(!reg.remove_ban("192.0.2.1/32").await.unwrap());
}

async fn audit_trail(reg: Registry) {
    let now = now_unix();
    let mut recs = Vec::new();
    for i in 0..5 {
        let mut r = AuditRecord::new(if i % 2 == 0 { "auth" } else { "channel_open" });
        r.at = now - 10 + i;
        r.device = Some(format!("cam-{i}"));
        r.operator = Some("alice".into());
        r.source = Some(format!("192.0.2.{i}:2222"));
        recs.push(r);
    }
    reg.insert_audit(&recs).await.unwrap();
    let all = reg.audit(&AuditQuery::default()).await.unwrap();
    assert_eq!(all.len(), 5);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq), "oldest first");
    let q = AuditQuery { event: Some("auth".into()), ..Default::default() };
    assert_eq!(reg.audit(&q).await.unwrap().len(), 3);
    let q = AuditQuery { device: Some("cam-1".into()), ..Default::default() };
    assert_eq!(reg.audit(&q).await.unwrap().len(), 1);
    let q = AuditQuery { source: Some("192.0.2.3".into()), ..Default::default() };
    assert_eq!(reg.audit(&q).await.unwrap().len(), 1);
    let q = AuditQuery { since: Some(now - 7), limit: Some(1), ..Default::default() };
    let newest = reg.audit(&q).await.unwrap();
    assert_eq!(newest.len(), 1);
    assert_eq!(newest[0].device.as_deref(), Some("cam-4"));
    let last = reg.audit_last_seq().await.unwrap();
    assert_eq!(reg.audit_after(last - 2, 10).await.unwrap().len(), 2);
    assert_eq!(reg.prune_audit(now - 7).await.unwrap(), 3);
    assert_eq!(reg.audit(&AuditQuery::default()).await.unwrap().len(), 2);
}

async fn leases(reg: Registry) {
    reg.add_device(&id("cam-1"), &key(), &BTreeMap::new(), &[]).await.unwrap();
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    let first = reg.add_listen(&id("cam-1"), 80, any, 30000..=30001, |_| true).await.unwrap();
    assert_eq!(first.port(), 30000);
    let second = reg.add_listen(&id("cam-1"), 8080, any, 30000..=30001, |_| true).await.unwrap();
    assert_eq!(second.port(), 30001);
    assert!(matches!(
        reg.add_listen(&id("cam-1"), 443, any, 30000..=30001, |_| true).await,
        Err(RegistryError::PortsExhausted(_))
    ));
    assert!(matches!(
        reg.add_listen(&id("cam-1"), 443, first, 30000..=30001, |_| true).await,
        Err(RegistryError::ListenTaken(_))
    ));
    assert!(matches!(
        reg.add_listen(&id("nobody"), 80, any, 30000..=30001, |_| true).await,
        Err(RegistryError::NoSuchDevice(_))
    ));
    assert_eq!(reg.listens().await.unwrap().len(), 2);
    assert!(reg.remove_listen(&id("cam-1"), 80).await.unwrap());
    reg.remove_device(&id("cam-1")).await.unwrap();
    assert!(reg.listens().await.unwrap().is_empty(), "a removed device's leases go with it");
    // OpenSSH mode: a device keeps its port; a device not listed frees it.
    let ports = reg.lease_openssh_ports(&["a".into(), "b".into()], 40000..=40010).await.unwrap();
    assert_eq!((ports["a"], ports["b"]), (40000, 40001));
    let ports = reg.lease_openssh_ports(&["b".into(), "c".into()], 40000..=40010).await.unwrap();
    assert_eq!((ports["b"], ports["c"]), (40001, 40000));
}

async fn host_key_reports(reg: Registry) {
    let (h1, h2) = ("ssh-ed25519 AAAA one".to_string(), "ssh-ed25519 BBBB two".to_string());
    reg.add_device(&id("cam-1"), &key(), &BTreeMap::new(), &[]).await.unwrap();
    assert_eq!(reg.report_host_keys(&id("cam-1"), std::slice::from_ref(&h1)).await.unwrap(), HostKeyReport::Registered);
    assert_eq!(reg.report_host_keys(&id("cam-1"), std::slice::from_ref(&h1)).await.unwrap(), HostKeyReport::Known);
    assert_eq!(reg.report_host_keys(&id("cam-1"), std::slice::from_ref(&h2)).await.unwrap(), HostKeyReport::Changed);
    let dev = reg.device(&id("cam-1")).await.unwrap().unwrap();
    assert_eq!(dev.host_keys, vec![h1.clone()]);
    assert_eq!(dev.host_keys_changed, Some(vec![h2.clone()]));
    assert_eq!(reg.reset_host_keys(&id("cam-1"), false).await.unwrap(), Some(vec![h2.clone()]));
    let dev = reg.device(&id("cam-1")).await.unwrap().unwrap();
    assert_eq!((dev.host_keys, dev.host_keys_changed), (vec![h2], None));
}

async fn revision_tracks_identity_changes(reg: Registry) {
    let r0 = reg.revision().await.unwrap();
    let k = key();
    reg.add_device(&id("cam-1"), &k, &BTreeMap::new(), &[]).await.unwrap();
    let r1 = reg.revision().await.unwrap();
    assert!(r1 > r0);
    // Tunnel records, presence and last-seen times are no identity change.
    reg.tunnel_up(&id("cam-1"), "a", &[22]).await.unwrap();
    reg.touch(&[id("cam-1")]).await.unwrap();
    reg.set_presence(&id("cam-1"), true, None).await.unwrap();
    assert_eq!(reg.revision().await.unwrap(), r1);
    reg.revoke_device(&id("cam-1")).await.unwrap();
    let r2 = reg.revision().await.unwrap();
    assert!(r2 > r1);
    reg.add_operator(&id("alice"), &key(), false, &[], &[], None).await.unwrap();
    assert!(reg.revision().await.unwrap() > r2);
}

async fn concurrent_writers_keep_keys_unique(reg: Registry) {
    // Ten writers race to register one key under ten names: one wins.
    let k = key();
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let (reg, k) = (reg.clone(), k.clone());
            tokio::spawn(async move {
                if i % 2 == 0 {
                    reg.add_device(&id(&format!("cam-{i}")), &k, &BTreeMap::new(), &[]).await
                } else {
                    reg.add_operator(&id(&format!("op-{i}")), &k, false, &[], &[], None).await
                }
            })
        })
        .collect();
    let mut won = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => won += 1,
            Err(RegistryError::KeyInUse { .. }) => {}
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    assert_eq!(won, 1);
}

async fn migrations_are_numbered_and_idempotent(reg: Registry) {
    assert_eq!(reg.schema_version().await.unwrap(), 4);
    reg.set_meta("k", "v1").await.unwrap();
    reg.set_meta("k", "v2").await.unwrap();
    assert_eq!(reg.meta("k").await.unwrap().as_deref(), Some("v2"));
    reg.ping().await.unwrap();
}

#[tokio::test]
async fn reopening_applies_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::open(dir.path()).await.unwrap();
    reg.add_device(&id("cam-1"), &key(), &BTreeMap::new(), &[]).await.unwrap();
    reg.close().await;
    let reg = Registry::open(dir.path()).await.unwrap();
    assert_eq!(reg.schema_version().await.unwrap(), 4);
    assert_eq!(reg.devices().await.unwrap().len(), 1);

    let pg = burrow_testkit::Postgres::start();
    let url = pg.create_database();
    // Two pivots starting at once apply each migration once.
    let (a, b) = tokio::join!(Registry::open_url(&url), Registry::open_url(&url));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(pg.psql(&url, "SELECT count(*) FROM schema_migrations"), "4");
    a.add_device(&id("cam-1"), &key(), &BTreeMap::new(), &[]).await.unwrap();
    assert_eq!(b.devices().await.unwrap().len(), 1);
}

async fn next(rx: &mut tokio::sync::mpsc::Receiver<Change>) -> Change {
    tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("a notification").unwrap()
}

/// The CA: one key from the start, rotations that overlap or cut at once,
/// serials that only go up, and the keys of removed operators.
async fn user_ca_rotation_and_certificates(reg: Registry) {
    use burrow_server::registry::signing_ca;
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let now = now_unix();
    burrow_server::ca::ensure(&reg, dir.path(), now).await.unwrap();
    let k1 = reg.user_cas().await.unwrap();
    assert_eq!(k1.len(), 1);
    // A second pivot finds it there and adds none.
    let other = tempfile::tempdir().unwrap();
    burrow_server::ca::ensure(&reg, other.path(), now).await.unwrap();
    assert_eq!(reg.user_cas().await.unwrap().len(), 1);
    assert!(!other.path().join("user_ca").exists());

    let alice_key = key();
    reg.add_operator(&id("alice"), &alice_key, false, &[], &[], Some(3600)).await.unwrap();
    // alice is no admin and has no --device-user: she logs in as herself.
    let p = vec!["burrow:alice:*".to_string()];
    let issue = |ttl: u64, at: i64| {
        let reg = reg.clone();
        let k = alice_key.clone();
        let p = p.clone();
        async move { burrow_server::ca::issue(&reg, &id("alice"), &k, &p, Duration::from_secs(ttl), at).await.unwrap() }
    };
    let c1 = issue(3600, now).await;
    let c2 = issue(3600, now).await;
    assert_eq!((c1.serial, c2.serial), (1, 2));
    assert_eq!(c1.ca_fingerprint, k1[0].fingerprint);
    assert_eq!(c1.valid_before, now + 3600);
    assert!(c1.valid_after < now);
    let cert = russh::keys::ssh_key::Certificate::from_openssh(&c1.certificate).unwrap();
    assert_eq!(cert.serial(), 1);
    assert_eq!(cert.valid_principals(), &p[..]);
    assert_eq!(cert.key_id(), "burrow operator=alice serial=1");

    // A planned rotation: the new key is trusted now, signs after the overlap.
    let (public, fp, pem, _) = burrow_server::ca::new_key();
    let (from, old_until) = reg.rotate_user_ca(&public, &fp, &pem, now, Duration::from_secs(600), false).await.unwrap();
    assert_eq!(from, now + 600);
    // The old key outlives the last certificate it may sign (8 h, the longest).
    assert_eq!(old_until, Some(now + 600 + 8 * 3600));
    let cas = reg.user_cas().await.unwrap();
    assert_eq!(cas.iter().filter(|c| c.trusted(now)).count(), 2);
    assert_eq!(signing_ca(&cas, now).unwrap().fingerprint, k1[0].fingerprint);
    assert_eq!(signing_ca(&cas, now + 600).unwrap().fingerprint, fp);
    // One rotation at a time.
    let (p2, f2, k2, _) = burrow_server::ca::new_key();
    let pending = reg.rotate_user_ca(&p2, &f2, &k2, now, Duration::from_secs(600), false).await;
    assert!(matches!(pending, Err(RegistryError::RotationPending { .. })), "{pending:?}");
    assert_eq!(issue(3600, now + 601).await.ca_fingerprint, fp);
    // At once: the new key signs, every other one is dropped.
    reg.rotate_user_ca(&p2, &f2, &k2, now + 700, Duration::ZERO, true).await.unwrap();
    let cas = reg.user_cas().await.unwrap();
    let trusted: Vec<&str> = cas.iter().filter(|c| c.trusted(now + 700)).map(|c| c.fingerprint.as_str()).collect();
    assert_eq!(trusted, [f2.as_str()]);
    assert_eq!(issue(3600, now + 700).await.serial, 4);

    // A rotation never lengthens the life of a key already retiring.
    let (p3, f3, k3, _) = burrow_server::ca::new_key();
    reg.rotate_user_ca(&p3, &f3, &k3, now + 800, Duration::from_secs(600), false).await.unwrap();
    let end = |fp: &str, cas: &[burrow_server::registry::CaRecord]| {
        cas.iter().find(|c| c.fingerprint == fp).unwrap().retires_at
    };
    let before = end(&f2, &reg.user_cas().await.unwrap());
    assert_eq!(before, Some(now + 1400 + 8 * 3600));
    let (p4, f4, k4, _) = burrow_server::ca::new_key();
    reg.rotate_user_ca(&p4, &f4, &k4, now + 1500, Duration::from_secs(100_000), false).await.unwrap();
    assert_eq!(end(&f2, &reg.user_cas().await.unwrap()), before);
    // Dropped keys keep no private half.
    let cas = reg.user_cas().await.unwrap();
    assert!(cas.iter().filter(|c| !c.trusted(now + 1500)).all(|c| c.private_key.is_empty()));
    assert!(cas.iter().filter(|c| c.trusted(now + 1500)).all(|c| !c.private_key.is_empty()));
    // A key that retired by time loses its private half at the next tidy.
    let cas = reg.user_cas().await.unwrap();
    let retiring = cas.iter().find(|c| c.fingerprint == f2).unwrap().retires_at.unwrap();
    assert_eq!(reg.forget_retired_ca_keys(retiring - 1).await.unwrap(), 0);
    assert_eq!(reg.forget_retired_ca_keys(retiring).await.unwrap(), 1);

    // Removing alice lists her key for devices' RevokedKeys while her
    // certificates run; a re-added, unrelated operator's is not listed.
    assert!(reg.revoked_operator_keys(now, 10).await.unwrap().is_empty());
    reg.remove_operator(&id("alice")).await.unwrap();
    // Removed: no certificate, even for a request already under way.
    let refused = burrow_server::ca::issue(&reg, &id("alice"), &alice_key, &p, Duration::from_secs(60), now).await;
    assert!(matches!(refused, Err(RegistryError::NoSuchOperator(_))), "{refused:?}");
    let revoked = reg.revoked_operator_keys(now, 10).await.unwrap();
    assert_eq!(revoked, [burrow_core::keys::openssh_line(&alice_key)]);
    assert!(reg.revoked_operator_keys(now + 2 * 3600, 10).await.unwrap().is_empty(), "expired ones are not listed");

    // A device's trust fetch is noted, at most once a minute.
    reg.add_device(&id("cam-1"), &key(), &BTreeMap::new(), &[]).await.unwrap();
    reg.set_trust_at(&id("cam-1"), now).await.unwrap();
    reg.set_trust_at(&id("cam-1"), now + 30).await.unwrap();
    assert_eq!(reg.device(&id("cam-1")).await.unwrap().unwrap().trust_at, Some(now));
    reg.set_trust_at(&id("cam-1"), now + 61).await.unwrap();
    assert_eq!(reg.device(&id("cam-1")).await.unwrap().unwrap().trust_at, Some(now + 61));
}
