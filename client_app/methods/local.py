"""The Local baseline's client: it trains and evaluates the model it keeps itself; messages
carry no parameters, and its train reply sends none."""

from __future__ import annotations

from flwr.app import Message, RecordDict

from client_app.method import ClientMethod, TrainJob
from client_app.session import Layout, Session
from common import protocol


class LocalClient(ClientMethod):
    def prepare_train(self, session: Session, msg: Message) -> TrainJob:
        model = session.local_model()
        return TrainJob(
            session,
            msg,
            model,
            session.spec.model_name,
            Layout(None, [], []),
            session.generator("train", protocol.read_round(msg)),
            None,
            self.answer_train,
            evaluation=session.evaluate_first(msg, model),
        )

    def answer_train(self, job: TrainJob, loss: float) -> RecordDict:
        job.session.save_local_model(job.model)
        n = len(job.session.data.y_train)
        return protocol.train_reply(None, n, loss, evaluation=job.evaluation)

    def evaluate(self, session: Session, msg: Message) -> RecordDict:
        return protocol.evaluate_reply(session.evaluate(session.local_model()))
