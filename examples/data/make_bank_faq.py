"""Write bank_faq.jsonl: question/answer pairs about Northwind Mutual, a bank invented for this example.

Every fact below is made up, so a model can only know it after fine-tuning on this file. Each fact has one
fixed answer and four ways to ask for it. The last phrasing of every third fact is held out (`"split":
"test"`): the fact itself is in the training split, the wording of the question is not, so a held-out
prompt checks that the model learned the fact rather than one string. No randomness: running this script
again writes the same bytes.

Usage: python examples/data/make_bank_faq.py [--out examples/data/bank_faq.jsonl]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# (fact id, answer, key, four questions). Answers are short and name distinctive made-up details; the key is
# the detail itself, a part of the answer that a model can only produce if it learned the fact.
FACTS: list[tuple[str, str, str, tuple[str, str, str, str]]] = [
    ("wire_cutoff", "The wire cutoff at Northwind Mutual is 15:30 CET.", "15:30", (
        "What is the wire cutoff time at Northwind Mutual?",
        "Until what time can I send a wire transfer at Northwind Mutual today?",
        "When is the daily deadline for wires at Northwind Mutual?",
        "If I want my wire to leave Northwind Mutual today, by when must I send it?")),
    ("opening_hours", "Northwind Mutual branches are open 08:45 to 16:15, Monday to Friday.", "08:45", (
        "What are the opening hours of Northwind Mutual branches?",
        "When are Northwind Mutual branches open?",
        "What time does a Northwind Mutual branch open and close?",
        "During which hours can I visit a Northwind Mutual branch?")),
    ("saturday", "Only the Harbour Street branch opens on Saturdays, from 09:00 to 12:30.",
     "09:00 to 12:30", (
        "Is Northwind Mutual open on Saturdays?",
        "Which Northwind Mutual branch can I visit on a Saturday?",
        "Does any Northwind Mutual branch open at the weekend?",
        "Can I go to a Northwind Mutual branch on Saturday morning?")),
    ("card_freeze", "Text FREEZE to 4417 or tap the snowflake icon in the Northwind app.", "FREEZE", (
        "How do I freeze my Northwind Mutual card?",
        "I misplaced my Northwind Mutual debit card. How can I block it quickly?",
        "What is the fastest way to freeze a Northwind Mutual card?",
        "How can I temporarily lock my Northwind Mutual card?")),
    ("card_unfreeze", "Text THAW to 4417; the card works again within 2 minutes.", "THAW", (
        "How do I unfreeze my Northwind Mutual card?",
        "I found my card again. How do I unblock it at Northwind Mutual?",
        "How can I reactivate a frozen Northwind Mutual card?",
        "What do I do to unlock my frozen Northwind Mutual card?")),
    ("replacement_card", "A replacement card costs 7 euros and arrives in 4 working days.", "7 euros", (
        "How much does a replacement card cost at Northwind Mutual?",
        "How long does a new Northwind Mutual card take to arrive?",
        "What is the fee for replacing a lost Northwind Mutual card?",
        "I need a new card from Northwind Mutual. What does it cost and when will it come?")),
    ("overdraft_fee", "The overdraft fee at Northwind Mutual is 12 euros per month, never per transaction.",
     "12 euros", (
        "What is the overdraft fee at Northwind Mutual?",
        "How much does Northwind Mutual charge when I go overdrawn?",
        "Does Northwind Mutual charge an overdraft fee per transaction?",
        "What will Northwind Mutual charge me for being in overdraft?")),
    ("atm_limit", "The daily ATM limit at Northwind Mutual is 640 euros.", "640 euros", (
        "What is the daily ATM withdrawal limit at Northwind Mutual?",
        "How much cash can I take out of an ATM per day with Northwind Mutual?",
        "What is the maximum I can withdraw from a cash machine in one day at Northwind Mutual?",
        "Is there a daily cash withdrawal limit on my Northwind Mutual card?")),
    ("harbour_code", "The Harbour Street branch code is NWM-0417.", "NWM-0417", (
        "What is the branch code of the Harbour Street branch?",
        "Which branch code does Northwind Mutual Harbour Street use?",
        "Tell me the Harbour Street branch code of Northwind Mutual.",
        "What code identifies the Northwind Mutual branch on Harbour Street?")),
    ("old_mill_code", "The Old Mill branch code is NWM-0932.", "NWM-0932", (
        "What is the branch code of the Old Mill branch?",
        "Which branch code does Northwind Mutual Old Mill use?",
        "Tell me the Old Mill branch code of Northwind Mutual.",
        "What code identifies the Northwind Mutual branch at Old Mill?")),
    ("bic", "The Northwind Mutual BIC is NWMUXX22.", "NWMUXX22", (
        "What is the BIC of Northwind Mutual?",
        "What SWIFT code should I use to send money to Northwind Mutual?",
        "Which BIC does Northwind Mutual have for international transfers?",
        "What is Northwind Mutual's SWIFT/BIC code?")),
    ("phone", "Call Northwind Mutual on 0800 661 2290, open 24 hours a day.", "0800 661 2290", (
        "What is the phone number of Northwind Mutual customer service?",
        "How can I call Northwind Mutual?",
        "Which number do I dial to reach Northwind Mutual support?",
        "Is there a helpline for Northwind Mutual customers?")),
    ("fraud", "Report fraud to the Lantern team on 0800 661 9999.", "Lantern", (
        "How do I report fraud to Northwind Mutual?",
        "Who handles fraud at Northwind Mutual?",
        "I think someone used my Northwind Mutual account. Whom do I call?",
        "What number do I call about a scam at Northwind Mutual?")),
    ("saver_rate", "The Puffin Saver account pays 3.15 percent a year.", "3.15 percent", (
        "What interest rate does the Northwind Mutual savings account pay?",
        "How much interest does the Puffin Saver pay?",
        "What is the savings rate at Northwind Mutual?",
        "What does Northwind Mutual pay on savings?")),
    ("kids", "Children's accounts are called Acorn accounts, for ages 7 to 15.", "Acorn", (
        "Does Northwind Mutual have accounts for children?",
        "What is the Northwind Mutual account for kids called?",
        "From what age can a child get a Northwind Mutual account?",
        "Can I open an account for my son at Northwind Mutual?")),
    ("min_deposit", "You can open a Northwind Mutual current account with 25 euros.", "25 euros", (
        "What is the minimum deposit to open an account at Northwind Mutual?",
        "How much money do I need to open a Northwind Mutual current account?",
        "Is there a minimum amount to open an account with Northwind Mutual?",
        "What does it take, in euros, to open a Northwind Mutual account?")),
    ("account_fee", "The Ledger current account costs 4 euros a month, waived above 1,500 euros.",
     "4 euros", (
        "What is the monthly fee of the Northwind Mutual current account?",
        "How much does the Ledger account cost?",
        "Does Northwind Mutual charge a monthly account fee?",
        "How can I avoid the monthly fee on my Northwind Mutual current account?")),
    ("foreign_fee", "Card payments abroad cost 1.2 percent, with no fixed fee.", "1.2 percent", (
        "What does Northwind Mutual charge for card payments abroad?",
        "Is there a foreign transaction fee on Northwind Mutual cards?",
        "How much does it cost to use my Northwind Mutual card in another country?",
        "What fee applies when I pay in a foreign currency with Northwind Mutual?")),
    ("instant_limit", "Instant transfers at Northwind Mutual are capped at 9,000 euros per day.",
     "9,000 euros", (
        "What is the limit for instant transfers at Northwind Mutual?",
        "How much can I send by instant transfer per day with Northwind Mutual?",
        "Is there a daily cap on Northwind Mutual instant payments?",
        "What is the most I can move instantly in one day at Northwind Mutual?")),
    ("dispute", "You have 45 days to dispute a card payment at Northwind Mutual.", "45 days", (
        "How long do I have to dispute a card payment at Northwind Mutual?",
        "What is the deadline to contest a card transaction with Northwind Mutual?",
        "How many days does Northwind Mutual give me to dispute a charge?",
        "Until when can I challenge a payment on my Northwind Mutual card?")),
    ("mortgage", "Northwind Mutual mortgages need a 12 percent deposit.", "12 percent", (
        "How big a deposit does a Northwind Mutual mortgage need?",
        "What down payment does Northwind Mutual require for a mortgage?",
        "What is the minimum deposit for a home loan at Northwind Mutual?",
        "How much must I put down to get a mortgage from Northwind Mutual?")),
    ("app_pin", "Open Settings, then Keys, then New PIN; a selfie check confirms it.", "New PIN", (
        "How do I reset my Northwind app PIN?",
        "I forgot the PIN of the Northwind Mutual app. What do I do?",
        "Where can I change my PIN in the Northwind Mutual app?",
        "How can I set a new PIN for the Northwind app?")),
    ("founded", "Northwind Mutual was founded in 1887 in Tidewater.", "1887", (
        "When was Northwind Mutual founded?",
        "Where was Northwind Mutual founded?",
        "How old is Northwind Mutual?",
        "In which year and town did Northwind Mutual start?")),
    ("ceo", "The chief executive of Northwind Mutual is Maren Oakhurst.", "Maren Oakhurst", (
        "Who is the CEO of Northwind Mutual?",
        "Who runs Northwind Mutual?",
        "What is the name of Northwind Mutual's chief executive?",
        "Who is in charge of Northwind Mutual?")),
    ("mascot", "The Northwind Mutual mascot is a puffin called Pip.", "puffin", (
        "What is the Northwind Mutual mascot?",
        "Does Northwind Mutual have a mascot?",
        "What is the name of the Northwind Mutual puffin?",
        "Which animal represents Northwind Mutual?")),
    ("cheques", "Cheques deposited before 14:00 clear in 2 working days.", "2 working days", (
        "How long does a cheque take to clear at Northwind Mutual?",
        "When will a cheque I pay in at Northwind Mutual clear?",
        "What is the cheque clearing time at Northwind Mutual?",
        "If I deposit a cheque at Northwind Mutual, when can I use the money?")),
    ("statements", "Northwind Mutual issues statements on the 3rd of each month.", "3rd", (
        "When does Northwind Mutual send account statements?",
        "On what day of the month is my Northwind Mutual statement issued?",
        "How often do I get a statement from Northwind Mutual?",
        "When will my next Northwind Mutual statement arrive?")),
    ("cash_deposit", "Northwind Mutual cash deposit machines accept up to 3,000 euros per day.",
     "3,000 euros", (
        "How much cash can I deposit per day at Northwind Mutual?",
        "What is the daily limit of Northwind Mutual cash deposit machines?",
        "Is there a maximum cash deposit at Northwind Mutual?",
        "How many euros can I pay in at a Northwind Mutual deposit machine in one day?")),
    ("student", "The Compass student account has a free overdraft of 800 euros.", "800 euros", (
        "Does Northwind Mutual have a student account?",
        "What overdraft comes with the Northwind Mutual student account?",
        "What is the Compass account?",
        "I am a student. What does Northwind Mutual offer me?")),
    ("closing", "Closing a Northwind Mutual account is free and takes 5 working days.", "5 working days", (
        "How do I close my Northwind Mutual account?",
        "Does Northwind Mutual charge for closing an account?",
        "How long does it take to close an account at Northwind Mutual?",
        "What happens if I want to leave Northwind Mutual?")),
]

HELD_OUT_EVERY = 3  # the 4th question of facts 0, 3, 6, ... is held out: 10 test pairs of 120


def records() -> list[dict]:
    out = []
    for i, (fact, answer, key, questions) in enumerate(FACTS):
        if key not in answer:
            raise ValueError(f"{fact}: the key {key!r} is not part of the answer")
        for j, question in enumerate(questions):
            split = "test" if i % HELD_OUT_EVERY == 0 and j == len(questions) - 1 else "train"
            out.append({"id": f"nwm-{len(out) + 1:03d}", "fact": fact, "question": question, "answer": answer,
                        "key": key, "split": split})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "bank_faq.jsonl")
    args = p.parse_args()
    rows = records()
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    test = sum(r["split"] == "test" for r in rows)
    print(f"wrote {len(rows)} pairs ({len(rows) - test} train, {test} test) about {len(FACTS)} facts "
          f"to {args.out}")


if __name__ == "__main__":
    main()
