//! /metrics: histograms of counts have count buckets, histograms of seconds
//! seconds buckets, and the process's resident memory is exposed.

mod common;

use common::*;

/// The `le` labels of a histogram's buckets, in order.
fn buckets(text: &str, name: &str) -> Vec<String> {
    let prefix = format!("{name}_bucket{{");
    text.lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?;
            Some(le[..le.find('"')?].to_owned())
        })
        .collect()
}

fn value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn histograms_have_fitting_buckets_and_memory_is_exposed() {
    let app = spawn_app().await;
    let a = app.register("hb").await;
    let b = app.register("hb").await;
    let room = app.direct(&a, &b).await;
    let (mut wa, _) = app.ws(&a).await;
    let ack = wa.send_msg(&room, "c1", "x").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let text = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    let batch = buckets(&text, "chatd_store_batch_size");
    assert_eq!(batch.first().map(String::as_str), Some("1"), "{text}");
    assert!(batch.iter().any(|le| le == "1024"), "{batch:?}");
    assert!(!batch.iter().any(|le| le == "0.0005"), "{batch:?}");
    // A batch of one message lands in the first bucket, not only in +Inf.
    let first = text
        .lines()
        .find(|l| l.starts_with("chatd_store_batch_size_bucket{le=\"1\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap();
    assert!(first >= 1.0, "{text}");

    let append = buckets(&text, "chatd_store_append_seconds");
    assert_eq!(append.first().map(String::as_str), Some("0.0005"), "{text}");

    let rss = value(&text, "process_resident_memory_bytes").expect("an RSS gauge");
    assert!(rss > 1024.0 * 1024.0, "{rss}");
    let anon = value(&text, "process_resident_memory_anon_bytes").expect("an anon RSS gauge");
    assert!(anon > 0.0 && anon <= rss, "{anon} {rss}");
}
