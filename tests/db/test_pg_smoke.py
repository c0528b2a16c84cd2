from sqlalchemy import create_engine, text


def test_throwaway_postgres_answers(pg_url: str) -> None:
    engine = create_engine(pg_url)
    with engine.connect() as conn:
        assert conn.execute(text("select 1 + 1")).scalar() == 2
    engine.dispose()
