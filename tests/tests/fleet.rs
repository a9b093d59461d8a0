//! The fleet on real engines: etcd behind the config service, Redis behind global rate limits.

use meridian_tests::engines::{EtcdCluster, Redis};

#[test]
fn engines_start_stop_and_survive_a_leader_kill() {
    let mut etcd = EtcdCluster::start();
    assert_eq!(etcd.endpoints().len(), 3);
    let leader = etcd.leader();
    etcd.kill(leader);
    let next = etcd.leader();
    assert_ne!(next, leader, "a new leader is elected among the survivors");
    etcd.restart(leader);

    let mut redis = Redis::start();
    assert!(redis.url().starts_with("redis://127."));
    redis.kill();
    redis.restart();
}
