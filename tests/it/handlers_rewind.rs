//! Rewinds undo effects (I10): a deep reorg under `on_deep_reorg =
//! "rewind"` and an operator's `rewind` revert the credits of the burns
//! they remove (`AFTER DELETE` trigger, `revert_function`,
//! `Handler::revert`) in their own transaction, so that balances equal the
//! canonical chain's burns; stored again, the burns are credited again.

use logcursor::poller::TickOutcome;
use tokio_util::sync::CancellationToken;

use crate::handlers::{balances, burns_on_chain, each_form, expected, open, Credit};
use crate::support::*;

each_form!(
    a_deep_reorg_rewind_reverts_the_credits_of_removed_burns,
    an_operator_rewind_reverts_every_credit_it_removes_page_by_page,
);

/// `credit` installed, and an account opened for each of two senders.
async fn two_accounts(w: &World, credit: Credit) -> (tokio_postgres::Client, Chain, Chain) {
    let pg = credit.install(&w.db).await;
    let (a, b) = (w.chain.clone(), w.chain.as_account(1).await);
    for acc in [a.sender(), b.sender()] {
        open(&pg, &acc).await;
    }
    (pg, a, b)
}

async fn a_deep_reorg_rewind_reverts_the_credits_of_removed_burns(credit: Credit) {
    let w = World::new().await;
    let (chain, emitter) = (&w.chain, &w.emitter);
    let (pg, a, b) = two_accounts(&w, credit).await;
    let accounts = [a.sender(), b.sender()];
    for i in 0..10 {
        let sender = if i % 2 == 0 { &a } else { &b };
        sender.receipt(&sender.burn(emitter, i % 3 + 1, i * 100).await).await;
    }
    let cfg = credit
        .configure(w.config().stream_toml("on_deep_reorg = \"rewind\""))
        .stream(|s| s.max_block_range = 4)
        .build();
    let app = credit.app(&cfg).await;
    app.tick_until_idle().await;
    let head = chain.block_number().await;
    let before = expected(&burns_on_chain(chain, emitter, head).await, &accounts);
    assert_eq!(balances(&pg).await, before);

    // Deeper than the safe head (confirmations = 0): the last 5 blocks,
    // with burns of both accounts, are replaced by one burn of a's.
    chain.reorg(emitter, 5, &[(3, 5000)]).await;
    let first = app.pollers()[0].tick(&CancellationToken::new()).await.expect("tick");
    assert!(
        matches!(first, TickOutcome::Rewound { events_deleted, .. } if events_deleted > 0),
        "{first:?}"
    );
    chain.mine(1).await;
    app.tick_until_idle().await;
    let head = chain.block_number().await;
    let after = expected(&burns_on_chain(chain, emitter, head).await, &accounts);
    assert_ne!(after, before, "the reorg changed what the balances should be");
    assert_eq!(balances(&pg).await, after, "balances equal the canonical chain's burns");
    w.assert_stored_equals_chain(&pg).await;
}

async fn an_operator_rewind_reverts_every_credit_it_removes_page_by_page(credit: Credit) {
    let w = World::new().await;
    let (chain, emitter) = (&w.chain, &w.emitter);
    let (pg, a, b) = two_accounts(&w, credit).await;
    let accounts = [a.sender(), b.sender()];
    // 3,500 burns: the second rewind removes more than a page of reverts (2,000).
    a.emit_burns(emitter, 18, |_| 100).await;
    b.emit_burns(emitter, 17, |_| 100).await;
    let cfg = credit.configure(w.config()).build();
    let app = credit.app(&cfg).await;
    app.tick_until_idle().await;
    let head = chain.block_number().await;
    assert_eq!(
        balances(&pg).await,
        expected(&burns_on_chain(chain, emitter, head).await, &accounts)
    );

    let rewind = |to: i64| {
        let (cfg, handlers) = (&cfg, credit.handlers());
        async move {
            logcursor::admin::rewind(cfg, "operator", &handlers, "burns", to)
                .await
                .expect("rewind")
        }
    };
    // Back to the block of the 2,101st burn (anvil may put several
    // transactions in a block), then to the start: more than a page.
    let mut burns = burns_on_chain(chain, emitter, head).await;
    burns.sort_by_key(|x| (x.key.2, x.key.1));
    let to = burns[2_100].key.2;
    let above = burns.iter().filter(|x| x.key.2 > to).count() as u64;
    assert!(above > 0 && to < head);
    let r = rewind(to).await;
    assert_eq!(r.events_deleted, above);
    let at = expected(&burns_on_chain(chain, emitter, to).await, &accounts);
    assert_eq!(
        balances(&pg).await,
        at,
        "the credits of the removed burns are taken back"
    );
    let r = rewind(-1).await;
    assert_eq!(r.events_deleted, 3_500 - above);
    assert!(r.events_deleted > 2_000, "more than a page of reverts");
    assert_eq!(balances(&pg).await, expected(&[], &accounts), "every credit taken back");

    app.tick_until_idle().await;
    assert_eq!(
        balances(&pg).await,
        expected(&burns_on_chain(chain, emitter, head).await, &accounts),
        "credited once again as they are stored again"
    );
}
