//! Telegram media end to end: captions of sent photos are edited with
//! `editMessageCaption`, and an album (several updates sharing a
//! `media_group_id`) reaches the bridge as one message.

use std::time::Duration;

use hg_e2e::{Stack, collect, dead_letters, next};
use hg_proto::{Attachment, DeliveryReceipt, InboundMessage, OutboundKind, OutboundMessage};
use hg_telegram::TelegramConfig;
use hg_testkit::fake_telegram::{FakeTelegram, private_chat, user};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);
const BOT_ID: i64 = 3001;

fn config(fake: &FakeTelegram, token: &str) -> TelegramConfig {
    hg_e2e::telegram::config(fake, &[token])
}

fn outbound(id: &str, kind: OutboundKind, text: &str) -> OutboundMessage {
    hg_e2e::telegram::outbound(BOT_ID, 5, id, kind, text)
}

#[tokio::test]
async fn an_edit_of_a_photo_replaces_its_caption() {
    let stack = Stack::start().await;
    let fake = FakeTelegram::start().await;
    let token = fake.add_bot(BOT_ID, "media_bot");
    let egress = stack.telegram_egress(config(&fake, &token)).await;
    let mut receipts = collect::<DeliveryReceipt>(&stack.bus, "hg.receipt.telegram.>").await;

    let mut photo = outbound("p-1", OutboundKind::Reply, "a *first* caption");
    photo.attachments = vec![Attachment {
        file_name: "chart.png".into(),
        mime_type: "image/png".into(),
        data: vec![0x89, b'P', b'N', b'G', 1, 2, 3],
        ..Default::default()
    }];
    hg_e2e::publish_outbound(&stack.bus, &photo).await;
    let sent = next(&mut receipts, "the photo's receipt").await;
    assert!(sent.delivered, "{sent:?}");
    let photo_msg = fake
        .sent()
        .into_iter()
        .find(|m| m.method == "sendphoto")
        .expect("sent as a photo");
    assert_eq!(photo_msg.visible_text, "a first caption");

    let mut edit = outbound("p-1-edit", OutboundKind::Edit, "the **final** caption");
    edit.edit_of = "p-1".into();
    hg_e2e::publish_outbound(&stack.bus, &edit).await;
    let receipt = next(&mut receipts, "the edit's receipt").await;
    assert!(receipt.delivered, "{receipt:?}");
    assert_eq!(
        receipt.platform_message_ids,
        [photo_msg.message_id.to_string()]
    );
    let edited = fake
        .sent()
        .into_iter()
        .find(|m| m.method == "editmessagecaption")
        .expect("the caption was edited");
    assert_eq!(edited.message_id, photo_msg.message_id);
    assert_eq!(edited.text, "the <b>final</b> caption");
    assert_eq!(edited.visible_text, "the final caption");
    assert!(
        fake.calls("editMessageText").is_empty(),
        "a photo has no text to edit"
    );

    // The same caption again: "not modified" is success.
    let mut again = edit.clone();
    again.id = "p-1-edit-2".into();
    hg_e2e::publish_outbound(&stack.bus, &again).await;
    let receipt = next(&mut receipts, "the repeated edit's receipt").await;
    assert!(receipt.delivered, "{receipt:?}");
    assert_eq!(fake.calls("editMessageCaption").len(), 2);
    // An edit of the edit goes to the photo too.
    let mut third = outbound("p-1-edit-3", OutboundKind::Edit, "third");
    third.edit_of = "p-1-edit".into();
    hg_e2e::publish_outbound(&stack.bus, &third).await;
    assert!(
        next(&mut receipts, "the third edit's receipt")
            .await
            .delivered
    );
    assert_eq!(
        fake.sent()
            .last()
            .map(|m| (m.method.clone(), m.visible_text.clone())),
        Some(("editmessagecaption".to_owned(), "third".to_owned()))
    );
    assert!(dead_letters(&stack.bus).await.is_empty());
    egress.stop().await;
}

#[tokio::test]
async fn an_edit_of_a_text_still_edits_the_text() {
    let stack = Stack::start().await;
    let fake = FakeTelegram::start().await;
    let token = fake.add_bot(BOT_ID, "media_bot");
    let egress = stack.telegram_egress(config(&fake, &token)).await;
    let mut receipts = collect::<DeliveryReceipt>(&stack.bus, "hg.receipt.telegram.>").await;
    hg_e2e::publish_outbound(&stack.bus, &outbound("t-1", OutboundKind::Reply, "draft")).await;
    assert!(next(&mut receipts, "the text's receipt").await.delivered);
    let mut edit = outbound("t-1-edit", OutboundKind::Edit, "final");
    edit.edit_of = "t-1".into();
    hg_e2e::publish_outbound(&stack.bus, &edit).await;
    assert!(next(&mut receipts, "the edit's receipt").await.delivered);
    assert_eq!(fake.calls("editMessageText").len(), 1);
    assert!(fake.calls("editMessageCaption").is_empty());
    egress.stop().await;
}

#[tokio::test]
async fn an_album_of_three_photos_is_one_message_with_three_attachments() {
    let stack = Stack::start().await;
    let fake = FakeTelegram::start().await;
    let token = fake.add_bot(BOT_ID, "media_bot");
    let mut tg = config(&fake, &token);
    tg.album_window = Duration::from_millis(700);
    let mut inbound = collect::<InboundMessage>(&stack.bus, "hg.in.telegram.>").await;
    let ingress = stack.telegram_ingress(tg).await;
    let chat = private_chat(5, "Ana");
    let ana = user(5, "Ana");
    let mut pushed = Vec::new();
    for n in 0..3u8 {
        let (file_id, unique) = fake.add_file(vec![n; 100], &format!("photos/p{n}.jpg"));
        let mut fields = json!({
            "media_group_id": "album-1",
            "photo": [{"file_id": file_id, "file_unique_id": unique, "file_size": 100, "width": 800, "height": 600}],
        });
        if n == 0 {
            fields["caption"] = json!("our trip");
        }
        pushed.push(fake.push_message(&token, &chat, &ana, fields));
        // Parts trickle in, as they do from Telegram.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let message = next(&mut inbound, "the album").await;
    assert_eq!(message.text, "our trip");
    assert_eq!(message.attachments.len(), 3, "{message:?}");
    assert!(
        message
            .attachments
            .iter()
            .all(|a| a.mime_type == "image/jpeg"
                && a.size_bytes == 100
                && !a.object_key.is_empty())
    );
    assert!(message.id.ends_with(&format!(":{}", pushed[0].message_id)));
    assert_eq!(
        message.metadata.get("media_group_id").map(String::as_str),
        Some("album-1")
    );
    // A text after it is its own message, and nothing else came.
    fake.push_text(&token, &chat, &ana, "after the album");
    let after = next(&mut inbound, "the text after the album").await;
    assert_eq!(after.text, "after the album");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        inbound.try_recv().is_err(),
        "an album part arrived on its own"
    );
    let stream = stack.bus.jetstream().get_stream("HG_IN").await.unwrap();
    assert_eq!(stream.get_info().await.unwrap().state.messages, 2);
    // Every part confirmed, none left.
    let deadline = std::time::Instant::now() + WAIT;
    while fake.pending_updates(&token) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "parts left unconfirmed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ingress.stop().await;
}
