//! The config service's documents (whole routing, API key hashes) are not for anyone who can
//! reach it: reads need a token, an edge follows with its read token, and the read token never
//! writes. Real sockets, loopback only.

use std::sync::Arc;

use meridian_config::{Control, HumanDuration};
use meridian_config_service::{serve, ClientError, ConfigClient, ConfigStore, ServiceState};
use meridian_tests::engines::start_edge_with_control;
use meridian_tests::{local_config, World};

const WRITE: &str = "attack-write-token";
const READ: &str = "attack-read-token";

fn rejected<T: std::fmt::Debug>(result: Result<T, ClientError>) -> u16 {
    match result {
        Err(ClientError::Rejected { status, .. }) => status,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn an_edge_follows_with_the_read_token_and_anonymous_readers_get_nothing() {
    let world = World::start(local_config());
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ConfigStore::open(&dir.path().join("store")).expect("store");
    let state = Arc::new(ServiceState::new(store, WRITE).with_read_token(Some(READ.into())));
    let listener = world
        .runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind the config service");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    world.runtime.spawn(serve(listener, state, async move {
        let _ = stopped.await;
    }));
    let writer = ConfigClient::new(&url, Some(WRITE.into())).expect("client");
    let document = toml::to_string(&world.config).expect("serializes");
    let push = |message: &str| {
        world
            .runtime
            .block_on(writer.push(&document, "test", message, None))
            .expect("push")
            .version
    };
    assert_eq!(push("first"), 1);

    let anonymous = ConfigClient::new(&url, None).expect("client");
    let reader = ConfigClient::new(&url, Some(READ.into())).expect("client");
    let run = |f: std::pin::Pin<Box<dyn std::future::Future<Output = u16> + '_>>| {
        world.runtime.block_on(f)
    };
    assert_eq!(
        run(Box::pin(async { rejected(anonymous.current().await) })),
        401
    );
    assert_eq!(
        run(Box::pin(async { rejected(anonymous.history().await) })),
        401
    );
    assert_eq!(
        run(Box::pin(async {
            rejected(
                anonymous
                    .wait_for_newer(0, std::time::Duration::from_millis(10))
                    .await,
            )
        })),
        401,
        "the long-poll"
    );
    assert_eq!(
        run(Box::pin(async {
            rejected(reader.push(&document, "eve", "x", None).await)
        })),
        401,
        "the read token never writes"
    );

    // The edge presents the read token from `[control] token_file`, and follows new versions.
    let token_file = dir.path().join("read.token");
    std::fs::write(&token_file, format!("{READ}\n")).expect("token file");
    let edge = start_edge_with_control(
        &world,
        Control {
            url: url.clone(),
            token_file: Some(token_file.display().to_string()),
            cache_dir: dir.path().join("edge-cache").display().to_string(),
            wait: HumanDuration::secs(30),
            ..Default::default()
        },
    );
    assert_eq!(world.wait_for_version(&edge, 1), 1);
    assert_eq!(push("second"), 2);
    assert_eq!(
        world.wait_for_version(&edge, 2),
        2,
        "the long-poll with the token"
    );
}
